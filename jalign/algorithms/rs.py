"""Rejection sampling (best-of-n) fine-tuning: sample n responses per prompt, keep the best, SFT on them.

Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", Sec. 3.2.3 (rejection sampling
fine-tuning); NeMo-Aligner's RS (``num_rollouts_per_prompt``, ``top_n_rollouts``). Per step, each of the P
prompts is answered ``num_rollouts_per_prompt`` = K times by the round's generator, every answer is scored by
the reward model (``roles.reward``) or a rule (``reward_fn``), and per prompt the ``top_n`` best are kept (of
those, only the ones scoring at least ``threshold`` when it is set: top-1, or all above a threshold with
``top_n = K``). The kept rows, selected on device, are trained on with the SFT loss (token mean over the kept
response tokens of the step). ``rs_iterations`` rounds split ``train.steps``; each round samples from the
policy as it was when the round began (rebuilt from the current policy, see ``gentrain``); by default every
step is a round of its own (sampling from the current policy).

``select: random`` keeps ``top_n`` samples per prompt at random instead: SFT on unfiltered samples, the
baseline with exactly the same generation and training compute.

Metrics: ``reward_mean`` (all samples), ``reward_kept_mean``, ``kept_fraction`` (kept / sampled rows),
``kl_to_start`` (per-sequence KL of the generator's samples to the starting policy, ``roles.reference``, at the
sampling temperature), ``ended_with_eos``, ``response_length``, and the SFT ``loss``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from jalign.algorithms.base import policy_token_logps
from jalign.algorithms.gentrain import ROW_KEYS, GenTrainAlgorithm, ScoredConfig, gather_rows, rank_key
from jalign.algorithms.registry import register
from jalign.config import ConfigError
from jalign.config_values import VALUE_RANGES, _AT_LEAST_1
from jalign.data.fields import ROW
from jalign.losses import kl_k1, sft_loss
from jalign.losses.ops import safe_divide
from jalign.models.heads import token_logps
from jalign.roles import RoleSpec
from jalign.rollout import experience as xp


@dataclass
class RSConfig(ScoredConfig):
    name: str = "rs"
    # rounds over train.steps, each sampling from the policy as it was when it began (None: every step)
    rs_iterations: Optional[int] = None
    num_rollouts_per_prompt: int = 4
    top_n: int = 1  # samples kept per prompt (NeMo-Aligner's top_n_rollouts)
    threshold: Optional[float] = None  # ... of which only those scoring >= threshold
    select: Literal["best", "random"] = "best"  # random: the unfiltered baseline of the same compute


VALUE_RANGES.setdefault("RSConfig", {"rs_iterations": _AT_LEAST_1, "top_n": _AT_LEAST_1})


def select_samples(keys, top_n: int, threshold: Optional[float] = None, select: str = "best", rng=None):
    """Which samples of each prompt are kept: ``keys`` [P, K] (scores; -inf never kept) ->
    ``(index [P, top_n] into each prompt's samples, keep [P, top_n] bool)``.

    ``best``: the ``top_n`` largest keys (ties: the lower index first), kept where finite and >= ``threshold``
    (if given). ``random``: ``top_n`` distinct samples uniformly at random (``rng``), kept where finite.
    """
    if select == "random":
        _, index = jax.lax.top_k(jax.random.uniform(rng, keys.shape), top_n)
        values = jnp.take_along_axis(keys, index, axis=1)
        return index, jnp.isfinite(values)
    values, index = jax.lax.top_k(keys, top_n)
    keep = jnp.isfinite(values)
    if threshold is not None:
        keep = keep & (values >= threshold)
    return index, keep


@register("rs", config=RSConfig)
class RejectionSampling(GenTrainAlgorithm):
    rounds_key = "rs_iterations"
    role_names = ("reference", "reward")
    fields = {k: ROW for k in ROW_KEYS + ("weight",)}

    def __init__(self, rt):
        a, src = rt.cfg.algorithm, rt.cfg.source or "<config>"
        if a.top_n > a.num_rollouts_per_prompt:
            raise ConfigError(f"{src}: algorithm.top_n={a.top_n} exceeds algorithm.num_rollouts_per_prompt="
                              f"{a.num_rollouts_per_prompt} (the samples drawn per prompt)")
        if a.select == "random" and a.threshold is not None:
            raise ConfigError(f"{src}: algorithm.threshold filters by reward; select: random keeps samples "
                              "regardless of it (the unfiltered baseline): drop one of them")
        self.rows_per_prompt = a.top_n
        super().__init__(rt)
        self.setup_reward()
        self._prepare = jax.jit(self._prepare_impl)
        self.generation_eval = self.generation_eval_for()

    def frozen_roles(self):
        return {"reference": RoleSpec(what="starting policy (the KL to the start)"),
                "reward": RoleSpec(source=None, lm_head=False, score_outputs=-1, what="reward model")}

    def learn(self, state, roles, batch, out):
        names = [n for n in ("reference", "reward") if n in roles]
        key = jax.random.fold_in(self.rollout_key(self._host_step), 1)
        rule = self.rule_scores(out, batch)
        train, metrics = self._prepare(roles.on_device(names), out, rule, key)
        self.log_rollouts(batch, out, train, extra=None if rule is None else {"rule_score": rule})
        state, m = self.update(state, roles, train)
        return state, {**metrics, **m}

    def _prepare_impl(self, roles, out, rule_score, key):
        a, s = self.a, self.sizes
        rows = xp.rollout_rows(out, self.tokenizer.pad_id)
        score = self.sequence_reward(roles, rows, rule_score)
        keys = rank_key(score, rows["ended"], a.truncated_response).reshape(s.prompts, s.per_prompt)
        index, keep = select_samples(keys, a.top_n, a.threshold, a.select, key)
        flat = (jnp.arange(s.prompts)[:, None] * s.per_prompt + index).reshape(-1)
        keep = keep.reshape(-1).astype(jnp.float32)
        kept = gather_rows({k: rows[k] for k in ROW_KEYS + ("mask",)}, flat)
        train = {k: kept[k] for k in ROW_KEYS}
        train["weight"] = kept["mask"] * keep[:, None]
        n_kept = jnp.sum(keep)
        metrics = {"reward_mean": jnp.mean(score), "reward_kept_mean": safe_divide(jnp.sum(score[flat] * keep), n_kept),
                   "kept_fraction": n_kept / s.rollout, "ended_with_eos": jnp.mean(rows["ended"]),
                   "response_length": jnp.mean(rows["lengths"].astype(jnp.float32))}
        if "reference" in roles:
            ref = token_logps(roles["reference"], rows, self.cfg.model, a.temperature)
            metrics["kl_to_start"] = jnp.mean(jnp.sum(kl_k1(rows["sampler_logps"], ref, rows["mask"]), -1))
        return self.to_train_batch(train), metrics

    def loss(self, params, mb, norms, roles):
        logps = policy_token_logps(params, mb, self.cfg.model)
        loss, m = sft_loss(logps, mb["weight"], norms["num_tokens"])
        return loss, {"loss": loss, "num_tokens": m["num_tokens"]}

    @staticmethod
    def normalizers(batch):
        return {"num_tokens": jnp.sum(batch["weight"])}

    def empty_reason(self, metrics):
        a = self.a
        why = [f"none scored at least algorithm.threshold={a.threshold}"] if a.threshold is not None else []
        if a.truncated_response == "last":
            why.append("none ended within algorithm.max_new_tokens (algorithm.truncated_response=last never keeps "
                       f"one that did not; ended_with_eos {float(metrics.get('ended_with_eos', 0)):.2f})")
        return "no sample was kept: " + (" or ".join(why) or "every sample's score was -inf")
