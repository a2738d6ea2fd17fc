"""Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback"; NeMo-Aligner's CAI
recipe): a constitution of principles (``jalign.data.constitution``) and its two stages.

* ``cai_sl`` (Sec. 3, the supervised stage): per step the round's generator (by default the starting policy for
  the whole run, as in the paper) answers P red-team prompts; for ``revision_rounds`` rounds the critic role
  (``roles.critic``, by default the starting policy itself; any instruct model in real use) critiques the
  answer against a principle sampled per answer and then revises it, each from a prompt rendered from the
  config's ``critique_template`` / ``revision_template`` and the chat template; the policy is trained with the
  SFT loss on (prompt, final revision). Revisions (or critiques) that did not end within their token budget
  are dropped (``truncated_revision: drop``) or trained on as they are (``keep``).
* ``cai_rlaif`` (Sec. 4, RL from AI feedback): online DPO (``jalign.algorithms.online_dpo``) whose annotator is
  the judge role (``roles.judge``): the policy samples two answers per prompt, the judge reads a
  multiple-choice prompt (``judge_template``) under a sampled principle in both orders, and the log-probs of
  the two choice tokens (``choices``) give the label (:func:`jalign.losses.judge_preference`: position bias
  cancels, swapping the answers flips the label). Pairs the judge is not sure of
  (confidence <= ``min_confidence``) or with identical answers are masked out. Every judged pair is also
  written to ``RUN_DIR/ai_feedback.jsonl`` as ``{"prompt","chosen","rejected"}`` preference data for jalign's
  reward model or offline DPO (``write_feedback``).

Prompts hold text the models wrote, so these rounds go through the host: responses are decoded (all rows, on
every process), the next prompts rendered and encoded, and generation / the judge's forward pass run again on
device with prompt blocks rounded up to ``PROMPT_BUCKET`` tokens (few distinct shapes, few compiles).
When the prompts have reference answers, metrics report how the answers change and how often the judge
agrees with the ground truth (``judge_agreement``: pairs with exactly one right answer).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms.base import policy_token_logps
from jalign.algorithms.gentrain import (ROW_KEYS, GenTrainAlgorithm, GenTrainConfig, all_texts, check_role_vocab,
                                        host_global, place_rows)
from jalign.algorithms.online_dpo import OnlineDPO, OnlineDPOConfig
from jalign.algorithms.registry import register
from jalign.config import ConfigError
from jalign.config_values import VALUE_RANGES, _AT_LEAST_1, _Range
from jalign.data import constitution as con
from jalign.data.fields import ROW
from jalign.losses import chunked_logps_at, judge_preference, sft_loss
from jalign.models import transformer as tfm
from jalign.roles import RoleSpec
from jalign.rollout import experience as xp

PROMPT_BUCKET = 16


@dataclass
class ConstitutionConfig:
    """The constitution and the prompt templates (fields: see ``jalign.data.constitution``)."""

    constitution: str = "builtin:tiny"  # builtin:tiny, a YAML list or a JSONL file of principles
    critique_template: str = con.CRITIQUE_TEMPLATE
    revision_template: str = con.REVISION_TEMPLATE
    judge_template: str = con.JUDGE_TEMPLATE


@dataclass
class CAISLConfig(GenTrainConfig, ConstitutionConfig):
    name: str = "cai_sl"
    iterations: Optional[int] = 1  # rounds over train.steps (1: the starting policy answers every prompt)
    revision_rounds: int = 1  # critique -> revision rounds per answer
    critique_max_new_tokens: int = 32
    revision_max_new_tokens: Optional[int] = None  # default: max_new_tokens
    critic_temperature: float = 0.0  # <= 0: greedy critiques and revisions
    # a critique or revision that did not end within its token budget: drop the row, or train on it as it is
    truncated_revision: Literal["drop", "keep"] = "drop"


@dataclass
class CAIRLAIFConfig(OnlineDPOConfig, ConstitutionConfig):
    name: str = "cai_rlaif"
    choices: list[str] = dataclasses.field(default_factory=lambda: ["A", "B"])  # one token each
    min_confidence: float = 0.0  # pairs with judge confidence |2p - 1| <= this are masked out
    write_feedback: bool = True  # RUN_DIR/ai_feedback.jsonl


VALUE_RANGES.setdefault("CAISLConfig", {"iterations": _AT_LEAST_1, "revision_rounds": _AT_LEAST_1,
                                        "critique_max_new_tokens": _AT_LEAST_1,
                                        "revision_max_new_tokens": _AT_LEAST_1})
VALUE_RANGES.setdefault("CAIRLAIFConfig", {"min_confidence": _Range(0, 1, hi_open=True)})


# ---- prompts ------------------------------------------------------------------------------------
class Prompts:
    """The constitution and the templates of a config, checked once; renders and encodes CAI prompts."""

    def __init__(self, a, tokenizer, chat_template):
        self.principles = con.load_constitution(a.constitution)
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.critique = a.critique_template
        self.revision = a.revision_template
        self.judge = a.judge_template
        con.check_template(self.critique, "algorithm.critique_template", con.CRITIQUE_FIELDS, ("response",))
        con.check_template(self.revision, "algorithm.revision_template", con.REVISION_FIELDS,
                           ("response", "critique"))
        con.check_template(self.judge, "algorithm.judge_template", con.JUDGE_FIELDS, ("response_a", "response_b"))

    def sample(self, seed: int, step: int, salt: int, n: int) -> list:
        """``n`` principles drawn uniformly, reproducibly from (seed, step, salt)."""
        idx = np.random.default_rng([seed, step, salt]).integers(len(self.principles), size=n)
        return [self.principles[i] for i in idx]

    def critique_text(self, prompt: str, response: str, p) -> str:
        return con.render(self.critique, "algorithm.critique_template", prompt=prompt, response=response,
                          critique_request=p.critique_request, principle=p.name)

    def revision_text(self, prompt: str, response: str, critique: str, p) -> str:
        return con.render(self.revision, "algorithm.revision_template", prompt=prompt, response=response,
                          critique_request=p.critique_request, principle=p.name, critique=critique,
                          revision_request=p.revision_request)

    def judge_text(self, prompt: str, a: str, b: str, p) -> str:
        return con.render(self.judge, "algorithm.judge_template", prompt=prompt, response_a=a, response_b=b,
                          judge_question=p.judge_question, principle=p.name)

    def ids(self, text: str) -> list[int]:
        """The rendered text as the user turn of a conversation awaiting the assistant (the chat template)."""
        from jalign.data.chat import encode_prompt

        return encode_prompt(text, self.chat_template, self.tokenizer)


def bucket(n: int) -> int:
    return xp.round_up(max(n, 1), PROMPT_BUCKET)


# ---- the judge ----------------------------------------------------------------------------------
def choice_ids(tokenizer, choices) -> list[int]:
    """The token id of each choice; a choice must be exactly one token."""
    out = []
    for c in choices:
        ids = tokenizer.encode(c)
        if len(ids) != 1:
            raise ConfigError(f"algorithm.choices: {c!r} is {len(ids)} tokens {ids}; the judge reads one token per "
                              "choice (e.g. 'A' / 'B', or ' A' / ' B' for tokenizers that merge the space)")
        out.append(ids[0])
    if len(out) != 2 or out[0] == out[1]:
        raise ConfigError(f"algorithm.choices: two different choice tokens are needed, got {choices}")
    return out


def choice_logps(params, cfg, tokens, positions, segment_ids, ids):
    """log p(choice | prompt) of each choice token at the last position of left-padded prompts: [B, len(ids)].
    A compare-and-sum over the (possibly sharded) vocabulary: nothing is gathered."""
    hidden = tfm.forward(params, tokens, positions, segment_ids, cfg)[:, -1:]
    ids = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (hidden.shape[0], 1, len(ids)))
    return chunked_logps_at(hidden, tfm.unembed_matrix(params, cfg), ids)[:, 0]


class Judge:
    """Both-orders multiple-choice judging of answer pairs with the judge role (``choice_logps`` on device)."""

    def __init__(self, algo, prompts: Prompts, choices):
        self.algo, self.prompts = algo, prompts
        self.ids = choice_ids(algo.tokenizer, choices)
        self._logps = {}

    def _program(self, cfg):
        key = repr(cfg)
        if key not in self._logps:
            self._logps[key] = jax.jit(lambda p, t, pos, s: choice_logps(p, cfg, t, pos, s, self.ids))
        return self._logps[key]

    def logps(self, params, cfg, prompt_ids: list) -> jax.Array:
        """[B, 2] choice log-probs for a list of encoded judge prompts (B divisible by the data-parallel size)."""
        from jalign.generate import prepare_prompts

        rt = self.algo.rt
        length = bucket(max(map(len, prompt_ids)))
        arrays = prepare_prompts(prompt_ids, pad_id=self.algo.tokenizer.pad_id, length=length)[:3]
        return self._program(cfg)(params, *(place_rows(x, rt.mesh, rt.rules) for x in arrays))

    def judge(self, params, cfg, texts: list, first: list, second: list, principles: list) -> dict:
        """``judge_preference`` of (first[i], second[i]) for prompt text texts[i], each pair rendered in both
        orders: {prob_first, label (1: first chosen), confidence, consistent, position_bias} [P] on device."""
        p = self.prompts
        ids = [p.ids(p.judge_text(t, a, b, q)) for t, a, b, q in zip(texts, first, second, principles)]
        ids += [p.ids(p.judge_text(t, b, a, q)) for t, a, b, q in zip(texts, first, second, principles)]
        lp = self.logps(params, cfg, ids)
        n = len(texts)
        return judge_preference(lp[:n, 0], lp[:n, 1], lp[n:, 0], lp[n:, 1])


def exact(text: str, answer) -> float:
    return float(answer is not None and text.strip() == str(answer).strip())


# ---- stage 1: supervised (critique -> revision) -------------------------------------------------
@register("cai_sl", config=CAISLConfig)
class CAISupervised(GenTrainAlgorithm):
    rounds_key = "iterations"
    role_names = ("critic",)
    fields = {k: ROW for k in ROW_KEYS + ("loss_mask",)}

    def __init__(self, rt):
        self.rows_per_prompt = rt.cfg.algorithm.num_rollouts_per_prompt
        super().__init__(rt)
        self.prompts = Prompts(self.a, self.tokenizer, self.cfg.data.chat_template)
        self.critic_cfg = check_role_vocab(self.cfg, "critic") or self.cfg.model
        self.critic_gen_cfg = dataclasses.replace(self.critic_cfg, init_from=None, hf_path=None)
        self.generation_eval = self.generation_eval_for(reward=False)

    def frozen_roles(self):
        return {"critic": RoleSpec(what="critic")}

    def critic_sample(self, critic, ids: list, max_new: int, key) -> tuple[list[str], np.ndarray]:
        """The critic's continuations of encoded prompts: (texts, ended) of every row."""
        a = self.a
        P, N = xp.rollout_shape(bucket(max(map(len, ids))), max_new, self.rt.mesh.shape["sequence"])
        out = self.sample(critic, self.critic_gen_cfg, ids, key, max_new_tokens=max_new, prompt_len=P,
                          new_len=N, greedy=a.critic_temperature <= 0,
                          temperature=a.critic_temperature if a.critic_temperature > 0 else 1.0)
        return all_texts(self.tokenizer, out), host_global(out["ended_with_eos"]).astype(bool)

    def revise(self, roles, texts: list, responses: list) -> tuple[list[str], np.ndarray, list]:
        """``revision_rounds`` of critique -> revision: (final revisions, ended [N], critiques of the last round)."""
        a, p = self.a, self.prompts
        key = jax.random.fold_in(self.rollout_key(self._host_step), 101)
        critic = roles.on_device(["critic"])["critic"]
        ended = np.ones(len(responses), bool)
        critiques = []
        for r in range(a.revision_rounds):
            ps = p.sample(self.cfg.train.seed, self._host_step, r, len(responses))
            critique_texts = [p.critique_text(t, y, q) for t, y, q in zip(texts, responses, ps)]
            critiques, c_end = self.critic_sample(critic, [p.ids(x) for x in critique_texts],
                                                  a.critique_max_new_tokens, jax.random.fold_in(key, 2 * r))
            revision_texts = [p.revision_text(t, y, c, q) for t, y, c, q in zip(texts, responses, critiques, ps)]
            ids = [p.ids(x) for x in revision_texts]
            # the last round's prompts, for algorithm.log_rollouts
            self.log_extra = {"principles": [q.name for q in ps], "critique_prompts": critique_texts,
                              "revision_prompts": revision_texts}
            responses, r_end = self.critic_sample(critic, ids, a.revision_max_new_tokens or a.max_new_tokens,
                                                  jax.random.fold_in(key, 2 * r + 1))
            ended &= c_end & r_end
        return responses, ended, critiques

    def sft_rows(self, row_prompts, revisions: list, keep: np.ndarray) -> dict:
        """Host rows [R, seq_len] of (prompt, revision) in the SFT layout; ``loss_mask`` 0 for dropped rows."""
        from jalign.data.chat import encode_pair
        from jalign.data.preference import sequence_row

        d, out = self.cfg.data, []
        for i, text, k in zip(row_prompts, revisions, keep):
            ex = self.train_prompts.examples[i]
            p_ids, r_ids = encode_pair(ex.prompt, text, d.chat_template, self.tokenizer)
            ids = np.asarray(list(p_ids) + list(r_ids), np.int32)
            mask = np.asarray([0] * len(p_ids) + [1] * len(r_ids), np.float32)
            fits = len(ids) - 1 <= d.seq_len
            row = sequence_row(ids[:d.seq_len + 1], mask[:d.seq_len + 1], d.seq_len, "lm")
            row["loss_mask"] = row["loss_mask"] * float(bool(k) and fits and bool(text.strip()))
            out.append(row)
        return {k: np.stack([r[k] for r in out]) for k in out[0]}

    def learn(self, state, roles, batch, out):
        rows = self.row_prompts(batch)
        texts = [self.train_prompts.texts[i] for i in rows]
        answers = all_texts(self.tokenizer, out)
        revisions, ended, critiques = self.revise(roles, texts, answers)
        host = self.sft_rows(rows, revisions, ended if self.a.truncated_revision == "drop" else np.ones_like(ended))
        s, mesh, rules = self.sizes, self.rt.mesh, self.rt.rules
        train = {k: jax.make_array_from_callback((s.accum, s.micro) + v.shape[1:],
                                                 _sharding(mesh, rules, self.fields[k]),
                                                 lambda idx, v=v.reshape((s.accum, s.micro) + v.shape[1:]): v[idx])
                 for k, v in host.items() if k in self.fields}
        self.log_rollouts(batch, out, train, extra={"prompts": texts, "answers": answers, "critiques": critiques,
                                                    "revisions": revisions, **self.log_extra})
        state, m = self.update(state, roles, train)
        refs = [self.train_prompts.answers[i] for i in rows]
        metrics = {"kept_fraction": float(np.mean(host["loss_mask"].sum(-1) > 0)),
                   "revision_changed_fraction": float(np.mean([a.strip() != r.strip() for a, r in zip(answers, revisions)])),
                   "critique_length": float(np.mean([len(c) for c in critiques]))}
        if any(r is not None for r in refs):
            metrics["answer_exact_match"] = float(np.mean([exact(t, r) for t, r in zip(answers, refs)]))
            metrics["revision_exact_match"] = float(np.mean([exact(t, r) for t, r in zip(revisions, refs)]))
        self._log_example(texts, answers, critiques, revisions)
        return state, {**metrics, **m}

    def _log_example(self, texts, answers, critiques, revisions) -> None:
        if self._host_step % max(self.cfg.train.log_every, 1) == 0 and jax.process_index() == 0:
            self.rt.log(f"cai_sl step {self._host_step}: {texts[0]!r} answer {answers[0]!r} -> critique "
                        f"{critiques[0]!r} -> revision {revisions[0]!r}")

    def loss(self, params, mb, norms, roles):
        logps = policy_token_logps(params, mb, self.cfg.model)
        loss, m = sft_loss(logps, mb["loss_mask"], norms["num_tokens"])
        return loss, {"loss": loss, "num_tokens": m["num_tokens"]}

    @staticmethod
    def normalizers(batch):
        return {"num_tokens": jnp.sum(batch["loss_mask"])}

    def empty_reason(self, metrics):
        return ("every revision was empty, longer than data.seq_len, or did not end within algorithm.max_new_tokens "
                f"(algorithm.truncated_revision={self.a.truncated_revision} drops those)")


def _sharding(mesh, rules, axes):
    from jalign.algorithms.base import field_sharding

    return field_sharding(mesh, rules, axes)


# ---- stage 2: RL from AI feedback ---------------------------------------------------------------
@register("cai_rlaif", config=CAIRLAIFConfig)
class CAIFeedback(OnlineDPO):
    role_names = ("reference", "judge")
    ranker_is_reward = False

    def __init__(self, rt):
        if rt.cfg.algorithm.num_rollouts_per_prompt != 2:
            raise ConfigError(f"{rt.cfg.source or '<config>'}: algorithm.num_rollouts_per_prompt="
                              f"{rt.cfg.algorithm.num_rollouts_per_prompt}: the judge compares two answers per prompt")
        super().__init__(rt)

    def setup_ranker(self) -> None:
        self.rule = None
        self.prompts = Prompts(self.a, self.tokenizer, self.cfg.data.chat_template)
        self.judge_cfg = check_role_vocab(self.cfg, "judge") or self.cfg.model
        self.judge = Judge(self, self.prompts, self.a.choices)

    def frozen_roles(self):
        specs = {"judge": RoleSpec(what="judge")}
        if self.a.reference == "start":
            specs["reference"] = RoleSpec(what="reference model (the starting policy)")
        return specs

    def ranking_roles(self):
        return ()

    def start(self, state, roles):
        super().start(state, roles)
        self._trim_feedback()

    def _trim_feedback(self) -> None:
        """A resumed run judges the steps after its checkpoint again: drop what an earlier attempt wrote of them."""
        path = self.rt.run_dir / "ai_feedback.jsonl"
        if jax.process_index() != 0 or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) < self._host_step]
        if len(keep) != len(lines):
            path.write_text("".join(keep))

    def rank_inputs(self, state, roles, batch, out) -> dict:
        idx = np.asarray(batch["prompt_index"])
        texts = [self.train_prompts.texts[i] for i in idx]
        answers = all_texts(self.tokenizer, out)
        first, second = answers[0::2], answers[1::2]
        principles = self.prompts.sample(self.cfg.train.seed, self._host_step, 0, len(idx))
        judged = self.judge.judge(roles.on_device(["judge"])["judge"], self.judge_cfg, texts, first, second,
                                  principles)
        self.log_extra = {"prompts": texts, "principles": [q.name for q in principles],
                          "judge_prompts": [self.prompts.judge_text(t, x, y, q)
                                            for t, x, y, q in zip(texts, first, second, principles)]}
        if self.a.write_feedback:
            self.write_feedback(idx, first, second, principles, jax.device_get(judged))
        inputs = {k: judged[k] for k in ("prob_first", "label", "confidence", "consistent", "position_bias")}
        if self.train_prompts.has_answers:
            refs = [self.train_prompts.answers[i] for i in idx]
            truth = np.asarray([[exact(a, r), exact(b, r)] for a, b, r in zip(first, second, refs)], np.float32)
            inputs["truth"] = place_rows(truth, self.rt.mesh, self.rt.rules)
        return inputs

    def rank(self, roles, rows, inputs):
        """The judge's label picks the chosen side of each pair; unsure judgements and identical answers are
        masked out. The pair's "rewards" (RPO) are the judge's probabilities of the two sides."""
        s, a = self.sizes, self.a
        first_chosen = inputs["label"] > 0
        c = jnp.where(first_chosen, 0, 1)
        tokens = rows["tokens"].reshape(s.prompts, 2, -1)
        seg = rows["segment_ids"].reshape(s.prompts, 2, -1)
        same = jnp.all((tokens[:, 0] == tokens[:, 1]) & (seg[:, 0] == seg[:, 1]), axis=-1)
        valid = ((inputs["confidence"] > a.min_confidence) & ~same).astype(jnp.float32)
        p_c = jnp.where(first_chosen, inputs["prob_first"], 1.0 - inputs["prob_first"])
        metrics = {"judge_consistent": jnp.mean(inputs["consistent"].astype(jnp.float32)),
                   "judge_position_bias": jnp.mean(inputs["position_bias"]),
                   "judge_confidence": jnp.mean(inputs["confidence"])}
        if "truth" in inputs:  # agreement with the ground truth on pairs with exactly one right answer
            truth = inputs["truth"]
            decisive = (truth[:, 0] != truth[:, 1]).astype(jnp.float32)
            agree = (first_chosen == (truth[:, 0] > truth[:, 1])).astype(jnp.float32)
            metrics.update(judge_agreement=jnp.sum(agree * decisive) / jnp.maximum(jnp.sum(decisive), 1.0),
                           judge_decisive_pairs=jnp.sum(decisive), answer_exact_match=jnp.mean(truth))
        return c, 1 - c, valid, jnp.stack([p_c, 1.0 - p_c], axis=1), metrics

    def write_feedback(self, idx, first, second, principles, judged) -> None:
        """The judged pairs as preference data (``{"prompt","chosen","rejected"}`` + the judge's confidence)."""
        if jax.process_index() != 0:
            return
        path = self.rt.run_dir / "ai_feedback.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for j, i in enumerate(idx):
                if first[j] == second[j] or not judged["confidence"][j] > self.a.min_confidence:
                    continue
                chosen, rejected = (first[j], second[j]) if judged["label"][j] else (second[j], first[j])
                f.write(json.dumps({"prompt": self.train_prompts.examples[i].prompt, "chosen": chosen,
                                    "rejected": rejected, "principle": principles[j].name,
                                    "confidence": float(judged["confidence"][j]),
                                    "step": self._host_step}) + "\n")

    def empty_reason(self, metrics):
        return (f"the judge's confidence |2p - 1| (mean {float(metrics.get('judge_confidence', 0)):.3g}) was not above "
                f"algorithm.min_confidence={self.a.min_confidence} for any pair whose two answers differ: the judge "
                "cannot tell the answers apart; train it further, or lower algorithm.min_confidence")
