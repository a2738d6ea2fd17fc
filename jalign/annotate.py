"""``jalign annotate``: SteerLM's attribute annotation (NeMo-Aligner's recipe, step 2).

    jalign annotate --model runs/steer_rm --input data/sft.jsonl --output data/sft_attrs.jsonl

A regression reward model (the run directory of a ``reward`` run with ``loss: regression``) scores every
example of an SFT dataset (``{"prompt", "response"}`` or ``{"messages"}``: the last assistant turn is scored in
its conversation) and each line is written again with

    "attributes":     {name: value quantised to the 0-4 scale}      (clamped to [0, 4], then rounded, as
                                                                      NeMo-Aligner's attribute_annotate.py)
    "attributes_raw": {name: the model's raw output}

every other field of the line kept as it was, one output line per input line, in order. ``--input`` may also
be a built-in source (``builtin:addition_steer_sloppy:train``). The scoring follows the reward model's own
training: its chat template and ``data.seq_len`` (a longer example is cut as in training, prompt first, and
counted). The output file appears only once every line is written (a failure leaves an existing file as it was).

Python: :func:`annotate_file`, :func:`quantize`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from jalign.errors import ConfigError


def quantize(value: float, max_value: int = 4) -> int:
    """A raw attribute score on the 0..max_value integer scale: clamp, then round (Python's round, as
    NeMo-Aligner's annotation script)."""
    return int(round(min(float(max_value), max(0.0, float(value)))))


# ---- input ----------------------------------------------------------------------------------------
def read_examples(spec: str, seed: int = 0) -> list[tuple[dict, object]]:
    """``[(the line's JSON object, its SFTExample)]`` of a JSONL file (every line validated, ``path:line`` on
    the first bad one) or of a built-in source."""
    from jalign.data.formats import DataError, _Bad, parse_sft

    if spec.startswith("builtin:"):
        from jalign.data.sources import load_source

        examples, _ = load_source(spec, "sft", seed=seed)
        return [({"prompt": ex.prompt, "response": ex.response} if ex.messages is None else
                 {"messages": ex.messages}, ex) for ex in examples]
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise _Bad(f"not valid UTF-8 JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise _Bad("expected a JSON object")
                ex = parse_sft(obj)
            except _Bad as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            ex.source = f"{path}:{lineno}"
            out.append((obj, ex))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def _prompt_response(ex):
    if ex.messages is None:
        return ex.prompt, ex.response
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    return ex.messages[:last], ex.messages[last]["content"]


# ---- the reward model -----------------------------------------------------------------------------
class RewardScorer:
    """A regression reward model from its run directory, on all local devices (data parallel)."""

    def __init__(self, spec: str, *, attributes: Optional[Sequence[str]] = None, seq_len: Optional[int] = None,
                 chat_template: Optional[str] = None, log=print):
        import jax

        from jalign.data.tokenizer import check_vocab, load_tokenizer
        from jalign.models import load
        from jalign.models.params import DTYPES
        from jalign.models.transformer import declare_params
        from sharding.mesh import make_mesh
        from sharding.rules import make_rules

        p = Path(spec)
        if not (p.is_dir() and (p / "config.yaml").is_file()):
            raise ConfigError(f"--model {spec}: not a jalign run directory (config.yaml); annotation reads a "
                              "regression reward-model run (jalign cannot load Hugging Face sequence classifiers yet)")
        from jalign.config import load_config

        run = load_config(p / "config.yaml")
        a = run.algorithm
        if getattr(a, "name", None) != "reward" or getattr(a, "loss", None) != "regression":
            raise ConfigError(f"--model {spec}: not a regression reward model (its algorithm is "
                              f"{getattr(a, 'name', None)!r} with loss {getattr(a, 'loss', None)!r}); annotation "
                              "needs `algorithm.name: reward` with `loss: regression`")
        source = load.parse_source(f"run:{p}", where="--model")
        cfg, template, train_len = run.model, run.data.chat_template, run.data.seq_len
        names = None if attributes else _run_attribute_names(run)
        names = list(attributes) if attributes else names
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        check_vocab(cfg.vocab_size, self.tokenizer, f"--model {spec}: the model's vocab_size")
        self.template = chat_template or template
        self.seq_len = seq_len or train_len or cfg.max_seq_len
        devices = jax.local_devices()
        self.mesh = make_mesh(len(devices), 1, 1, 1, devices=devices)
        self.rules = make_rules()
        if not names:
            raise ConfigError(f"--model {spec}: cannot tell the attribute names; give --attributes a,b,...")
        decls = declare_params(cfg, lm_head=False, score_outputs=len(names))
        self.params = load.load_params(source, decls, mesh=self.mesh, rules=self.rules, dtype=DTYPES[cfg.param_dtype],
                                       role="reward model", where="--model", log=log)
        self.cfg, self.names = cfg, names
        self._score = jax.jit(self._score_impl)

    def _score_impl(self, params, tokens, positions, segment_ids):
        from jalign.models.heads import sequence_scores

        return sequence_scores(params, tokens, positions, segment_ids, self.cfg)

    def score(self, examples, batch_size: int = 64) -> tuple[np.ndarray, int]:
        """Raw scores [N, A] of (prompt, response) pairs, and how many were cut to fit ``seq_len``."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        from jalign.data.chat import encode_pair
        from jalign.data.preference import fit_responses, sequence_row
        from sharding.rules import use_rules

        rows, truncated = [], 0
        for prompt, response in examples:
            p, r = encode_pair(prompt, response, self.template, self.tokenizer)
            fitted, status = fit_responses(p, [r], self.seq_len, "truncate")
            if fitted is None:
                raise ConfigError(f"an example does not fit --seq-len {self.seq_len} even cut (prompt + response)")
            truncated += status == "truncated"
            ids, mask = fitted[0]
            rows.append(sequence_row(np.asarray(ids, np.int32), np.asarray(mask, np.float32), self.seq_len, "score"))
        n_dev = len(self.mesh.devices.reshape(-1))
        batch_size = -(-batch_size // n_dev) * n_dev
        sharding = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
        out = []
        with use_rules(self.mesh, self.rules):
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                chunk = chunk + [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (batch_size - len(chunk))
                args = [jax.device_put(np.stack([r[k] for r in chunk]), sharding)
                        for k in ("tokens", "positions", "segment_ids")]
                out.append(np.asarray(jax.device_get(self._score(self.params, *args)))[:len(rows) - start])
        return np.concatenate(out)[:len(rows)], truncated


def _run_attribute_names(run) -> list[str]:
    """The attribute names of a regression run, as its training data ordered them (sorted names)."""
    from jalign.data.sources import load_source

    examples, _ = load_source(run.data.train, "reward", run.data.skip_bad_lines, seed=run.data.seed,
                              max_examples=run.data.max_examples)
    return sorted({k for ex in examples for k in ex.attributes})


# ---- the whole step -------------------------------------------------------------------------------
def annotate_file(model: str, input_spec: str, output: str, *, attributes: Optional[Sequence[str]] = None,
                  max_value: int = 4, batch_size: int = 64, seq_len: Optional[int] = None,
                  chat_template: Optional[str] = None, seed: int = 0, log=print) -> dict:
    """Annotate ``input_spec`` with the reward model ``model`` into ``output`` (see the module docstring).
    Returns counts ``{"lines", "truncated"}`` and the attribute names."""
    from jalign.generate import _output

    pairs = read_examples(input_spec, seed)
    scorer = RewardScorer(model, attributes=attributes, seq_len=seq_len, chat_template=chat_template, log=log)
    raw, truncated = scorer.score([_prompt_response(ex) for _, ex in pairs], batch_size)
    if not np.isfinite(raw).all():
        bad = int(np.argmax(~np.isfinite(raw).all(-1)))
        raise ConfigError(f"{model}: non-finite attribute scores (first at {pairs[bad][1].source or bad}); "
                          "nothing written")
    with _output(output) as f:
        for (obj, _), values in zip(pairs, raw):
            line = dict(obj)
            line["attributes"] = {n: quantize(v, max_value) for n, v in zip(scorer.names, values)}
            line["attributes_raw"] = {n: float(v) for n, v in zip(scorer.names, values)}
            f.write(json.dumps(line) + "\n")
    counts = {"lines": len(pairs), "truncated": truncated, "attributes": scorer.names}
    log(f"jalign annotate: {len(pairs)} lines written to {output} (attributes {', '.join(scorer.names)}; "
        f"{truncated} cut to seq_len={scorer.seq_len})")
    return counts


def annotate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="jalign annotate", description="Annotate SFT data with a regression reward "
                                 "model's attributes (SteerLM).")
    ap.add_argument("--model", required=True, help="a regression reward-model run directory")
    ap.add_argument("--input", required=True, help="SFT JSONL, or a built-in source builtin:NAME:SPLIT[:N]")
    ap.add_argument("--output", required=True, help="the annotated JSONL to write")
    ap.add_argument("--attributes", help="comma-separated names of the model's outputs, in order (default: the "
                                         "names of the run's training data, sorted, as it trained them)")
    ap.add_argument("--max-value", type=int, default=4, help="the top of the integer scale (default 4)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, help="default: the reward model's data.seq_len")
    ap.add_argument("--chat-template", help="default: the reward model's data.chat_template")
    ap.add_argument("--seed", type=int, default=0, help="for a built-in --input")
    a = ap.parse_args(argv)
    if a.max_value < 1 or a.batch_size < 1 or (a.seq_len is not None and a.seq_len < 2):
        raise ConfigError("--max-value and --batch-size must be >= 1, --seq-len >= 2")
    names = [n.strip() for n in a.attributes.split(",") if n.strip()] if a.attributes else None
    annotate_file(a.model, a.input, a.output, attributes=names, max_value=a.max_value, batch_size=a.batch_size,
                  seq_len=a.seq_len, chat_template=a.chat_template, seed=a.seed,
                  log=lambda m: print(m, file=sys.stderr))
    return 0

