"""The configuration reference, generated from the config dataclasses: every key, its type, default and meaning.

    python -m jalign.docs_gen > docs/configuration.md      # (what tests/test_docs.py compares against)
    jalign config --list [SECTION]                         # the same as plain text, e.g. SECTION = train or dpo

The meaning of a key is the comment next to its field: the comment at the end of its line, else the comment
lines right above it (read from the source with ``tokenize``). A few fields of algorithm configs have none yet;
``MEANINGS`` holds theirs until the comment is written next to the field (a comment there wins).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml

# Meanings of fields that have no comment in their own (algorithm) module yet: "Class.field" -> meaning.
MEANINGS = {
    "RLConfig.clip_eps_high": "DAPO clip-higher: the upper bound 1 + high of the ratio (default clip_eps)",
    "RLConfig.mismatch_cap": "the cap of the training/rollout importance weights (mismatch_correction)",
    "RLConfig.max_resample_rounds": "dynamic sampling: at most this many extra rollout rounds per step",
    "RLConfig.overlong_penalty_factor": "soft overlong punishment: the penalty at the last token of the buffer",
    "MonitorConfig.gold": "the signal the optimised reward is checked against: auto, a reward term, exact_match, none",
    "MonitorConfig.window": "evaluations over which the reward and gold trends are fitted",
    "MonitorConfig.min_reward_rise": "the alarm needs the optimised reward to rise by more than this over the window",
    "MonitorConfig.min_gold_drop": "... while the gold signal falls by more than this",
    "MonitorConfig.entropy_ratio": "entropy-collapse alarm below this fraction of the first evaluation's entropy",
    "DistillConfig.kd_weight": "weight of the KD term (KL to the teacher's top-k)",
    "DistillConfig.temperature": "softmax temperature of teacher and student in the KD term",
    "DistillConfig.kd_loss": "fwd_kl: KL(teacher || student) on the teacher's top-k; bwd_kl: the reverse KL",
    "DistillConfig.teacher": "live: a teacher forward pass each step; precomputed: its top-k stored once, then released",
    "RewardConfig.loss": "bt: Bradley-Terry on pairs; bt_margin / bt_scaled: with the data's reward margin; "
                         "regression: per-attribute regression (SteerLM)",
    "RewardConfig.num_attributes": "outputs of the score head (attributes of regression data)",
    "DPOConfig.loss": "the preference loss (jalign.losses): reference-based dpo (cDPO with label_smoothing), ipo, "
                      "rpo_*, slic, robust, apo_*, sppo_hard, nca_pair, bco_pair; reference-free orpo, simpo, cpo",
    "DPOConfig.beta": "strength of the implicit KL to the reference (the DPO / IPO beta)",
    "DPOConfig.sft_weight": "weight of the NLL of the chosen responses added to the loss (0: pure DPO)",
    "RLConfig.name": "the algorithm's name",
    "RLConfig.num_rollouts_per_prompt": "samples per prompt in each step",
    "RLConfig.max_new_tokens": "longest response sampled",
    "RLConfig.temperature": "sampling temperature of the rollouts",
    "RLConfig.top_k": "sample among the k most likely tokens (0: all)",
    "RLConfig.top_p": "nucleus sampling threshold (1: off)",
    "RLConfig.ppo_epochs": "passes over each rollout batch",
    "RLConfig.minibatch_size": "rows per optimizer update (null: the whole rollout)",
    "RLConfig.micro_batch_size": "rows per accumulation step (null: the minibatch)",
    "RLConfig.clip_eps": "PPO ratio clipping epsilon",
    "RLConfig.entropy_coef": "weight of the entropy bonus",
    "RLConfig.kl_coef": "weight of the KL to the reference",
    "RLConfig.reward_scale": "reward standardisation: r <- (r - reward_offset) / reward_scale",
    "RLConfig.reward_clip": "reward standardisation: clip to +- this after scaling (null: no clipping)",
    "GenTrainConfig.num_rollouts_per_prompt": "samples per prompt in each step",
    "GenTrainConfig.max_new_tokens": "longest response sampled",
    "GenTrainConfig.temperature": "sampling temperature",
    "GenTrainConfig.top_k": "sample among the k most likely tokens (0: all)",
    "GenTrainConfig.top_p": "nucleus sampling threshold (1: off)",
    "GenTrainConfig.micro_batch_size": "training rows per accumulation step (null: all of a step's rows at once)",
    "ScoredConfig.reward_fn": "a rule-based reward from jalign.rewards (e.g. exact_match); else roles.reward",
    "ScoredConfig.reward_attribute": "which reward-model output is the score",
    "ScoredConfig.truncated_response": "last: a response cut at max_new_tokens ranks below every finished one; "
                                       "keep: ranked by its reward like the others",
    "OnlineDPOConfig.reference": "start: the starting policy (roles.reference); previous: the policy as each "
                                 "round began",
    "OnlineDPOConfig.beta": "strength of the implicit KL to the reference (the DPO beta)",
    "OnlineDPOConfig.label_smoothing": "cDPO: the probability that a pair's label is flipped",
    "OnlineDPOConfig.eta": "RPO: delta* = eta * (R_chosen - R_rejected)",
    "OnlineDPOConfig.length_normalize": "per-token mean log-probs instead of sums",
    "OnlineDPOConfig.sft_weight": "weight of the NLL of the chosen responses added to the loss",
    "ConstitutionConfig.critique_template": "prompt of a critique (fields: see jalign.data.constitution)",
    "ConstitutionConfig.revision_template": "prompt of a revision (fields: see jalign.data.constitution)",
    "ConstitutionConfig.judge_template": "prompt of the AI judge comparing two responses",
    "CAISLConfig.critique_max_new_tokens": "longest critique sampled",
    "KTOConfig.beta": "strength of the implicit KL to the reference (the KTO beta)",
    "KTOConfig.desirable_weight": "weight of the desirable examples' term",
    "KTOConfig.undesirable_weight": "weight of the undesirable examples' term",
    "OPDConfig.loss": "reverse_kl: policy gradient on the student's samples with the teacher's log-probs; "
                      "jsd: generalised Jensen-Shannon divergence per token",
    "PPOConfig.kl_horizon": "adaptive KL: the horizon (in samples) of the coefficient's update",
    "PPOConfig.gamma": "GAE discount",
    "PPOConfig.lam": "GAE lambda",
    "PPOConfig.whiten_advantages": "normalise the advantages over the rollout batch",
    "PPOConfig.value_clip": "clipping of the value-function update",
}

HEADER = """# Configuration reference

Generated from the config dataclasses by `python -m jalign.docs_gen` (`jalign config --list [SECTION]` prints the
same on the command line); `tests/test_docs.py` fails when this file is out of date, so do not edit it by hand.

Every key can be set in the YAML config or overridden on the command line as `section.key=value` (YAML syntax:
`data.train='[{source: a.jsonl, weight: 0.7}, {source: b.parquet, weight: 0.3}]'`). Unknown keys, wrong types and
out-of-range values fail before any device work, naming the file, line and key. With `model.hf_path` or
`model.init_from` the architecture keys come from the weights' source and may be left out. The `algorithm`
section depends on `algorithm.name`: one table per built-in algorithm below.
"""


# ---- reading the source -----------------------------------------------------------------------------
@functools.cache  # once per class: parsing its module's source for each of ~500 fields took ~9 s
def _comments(cls) -> dict[str, str]:
    """{field: meaning} from the comments next to the fields in the source of ``cls`` (not its bases)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    by_line = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    lines = source.splitlines()
    out = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name, line = node.target.id, node.lineno
        trailing = [text for ln, (col, text) in by_line.items() if node.lineno <= ln <= node.end_lineno
                    and col > 0 and lines[ln - 1][:col].strip()]
        if trailing:
            out[name] = trailing[-1]
            continue
        above, ln = [], line - 1
        while ln in by_line and not lines[ln - 1][:by_line[ln][0]].strip():
            above.insert(0, by_line[ln][1])
            ln -= 1
        if above:
            out[name] = " ".join(above)
    return out


def meaning(cls, name: str) -> str:
    """The meaning of ``name`` from the first class along the MRO that has one (a subclass that only changes a
    default keeps its base's meaning): its ``MEANINGS`` entry and its comment, joined when both exist (the
    comment next to a field often only adds a special case, e.g. ``beta  # ORPO: its lambda``)."""
    if name == "name" and cls.__name__.endswith("Config") and "algorithm" in cls.__module__:
        return "selects this algorithm"
    for klass in cls.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            parts = [MEANINGS.get(f"{klass.__name__}.{name}"), _comments(klass).get(name)]
            text = "; ".join(p for p in parts if p)
            if text:
                return text
    return ""


# ---- types and defaults --------------------------------------------------------------------------
def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if origin is Literal:
        return " \\| ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (Union, types.UnionType):
        # a fixed order (scalars first, then lists, mappings, sections): typing caches Optional[X] by X, and
        # Unions with the same members in any order are equal, so the first spelling built sets the order
        names = sorted((type_name(a) for a in args if a is not type(None)),
                       key=lambda n: (n.startswith(("list of", "mapping", "section")), n))
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping {type_name(args[0])} → {type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, str) and "\n" in value:  # a template: one line, newlines escaped
        return json.dumps(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _nested(tp) -> list[tuple[str, type]]:
    """Dataclasses reachable inside a field type, with the key suffix they appear under."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return [("", tp)]
    if origin in (Union, types.UnionType):
        return [n for a in args for n in _nested(a)]
    if origin is list:
        return [("[i]" + s, c) for s, c in _nested(args[0])]
    if origin is dict:
        return [(".NAME" + s, c) for s, c in _nested(args[1])]
    return []


def rows(cls, prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every field of ``cls`` under ``prefix``, nested sections after it."""
    out, seen = [], set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = hints[f.name]
        key = f"{prefix}.{f.name}"
        out.append((key, type_name(tp), default_text(f), meaning(cls, f.name)))
        for suffix, sub in _nested(tp):
            if (key + suffix, sub) not in seen:
                seen.add((key + suffix, sub))
                out += rows(sub, key + suffix)
    return out


def sections() -> list[tuple[str, str, list]]:
    """(title, description, rows) of every section, the algorithm sections last."""
    from jalign.algorithms.registry import BUILTIN, builtin_names, resolve
    from jalign.config import Config, RoleConfig

    out = []
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name in ("source", "explicit", "algorithm"):
            continue
        if f.name == "roles":
            out.append(("roles", _doc(RoleConfig), rows(RoleConfig, "roles.NAME")))
            continue
        cls = hints[f.name]
        out.append((f.name, _doc(cls), rows(cls, f.name)))
    for name in builtin_names():
        try:
            cls = resolve(name)
        except ModuleNotFoundError as e:  # a registry entry whose module is not in this checkout (yet)
            if e.name != BUILTIN[name]:
                raise
            continue
        out.append((f"algorithm: {name}", _doc(cls.config_class), rows(cls.config_class, "algorithm")))
    return out


def _doc(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(cls.__name__ + "("):  # the dataclass's generated signature, not a docstring
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\\\\|", "\\|") if text else ""


def markdown() -> str:
    parts = [HEADER]
    for title, doc, section_rows in sections():
        parts.append(f"## {title}\n")
        if doc:
            parts.append(doc.replace("|", "\\|") + "\n")
        parts.append("| key | type | default | meaning |\n|---|---|---|---|")
        for key, tp, default, text in section_rows:
            parts.append(f"| `{key}` | {tp} | `{_cell(default)}` | {_cell(text)} |")
        parts.append("")
    return "\n".join(parts)


def listing(section: Optional[str] = None) -> str:
    """Plain text of one section (``model``, ``train.wandb``, ``dpo`` / ``algorithm.dpo``) or all of them."""
    chosen = []
    for title, _, section_rows in sections():
        name = title.removeprefix("algorithm: ")
        keep = section is None or section in (title, name, f"algorithm.{name}", f"algorithm:{name}")
        picked = section_rows if keep else [r for r in section_rows if section and r[0].startswith(section + ".")
                                            and not title.startswith("algorithm")]
        if picked:
            chosen.append((title, picked))
    if not chosen:
        return ""
    lines = []
    for title, section_rows in chosen:
        lines.append(f"[{title}]")
        for key, tp, default, text in section_rows:
            lines.append(f"  {key} ({tp.replace(chr(92) + '|', '|')}, default {default})")
            if text:
                lines.append(f"      {text}")
    return "\n".join(lines)


def section_names() -> list[str]:
    return [title.removeprefix("algorithm: ") for title, _, _ in sections()]


if __name__ == "__main__":
    sys.stdout.write(markdown())
