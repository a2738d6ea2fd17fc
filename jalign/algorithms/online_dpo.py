"""Online / iterative DPO: on-policy pairs ranked by a reward model or a rule, trained with the DPO family.

Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (online DPO: each step's pairs are
sampled from the current policy and labelled by an annotator); Xiong et al. 2024, "Iterative Preference
Learning from Human Feedback" (rounds of sampling from the current iterate, best-vs-worst of k samples, the
previous iterate as the reference). Per step each of the P prompts is answered ``num_rollouts_per_prompt`` = K
times (>= 2) by the round's generator; the samples are scored by the reward model (``roles.reward``) or a rule
(``reward_fn``); the best and the worst form the pair, built on device as [P, 2, T] rows (side 0 chosen,
1 rejected, as ``jalign.data.preference``). A pair whose two scores do not differ by more than ``min_margin``
carries no preference (a rule's tie) and is masked out (``valid_pair_fraction``). The loss is the DPO-family
loss of ``algorithm.loss`` (``dpo``, ``ipo``, ``rpo_*``; the rewards of RPO are the two scores) plus
``sft_weight`` x the NLL of the chosen responses, exactly as offline DPO (``jalign.algorithms.dpo``).

The reference (``reference``): ``start`` is the starting policy (``roles.reference``, default policy-init);
``previous`` is the previous iterate: rebuilt from the policy at every round (``iterations`` rounds over
``train.steps``; None: every step), which then also samples the round's pairs. Its log-prob sums are computed
once per step, when the pairs are built. A judge role as the annotator (RLAIF, under a constitution) is
``algorithm.name: cai_rlaif`` (``jalign.algorithms.cai``), which is this algorithm with another ranker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from jalign.algorithms.dpo import pair_sequence_logps, preference_loss
from jalign.algorithms.gentrain import ROW_KEYS, GenTrainAlgorithm, ScoredConfig, rank_key
from jalign.algorithms.registry import register
from jalign.algorithms.reward import pair_valid, unstack_pairs
from jalign.config import ConfigError
from jalign.config_values import VALUE_RANGES, _AT_LEAST_1, _NON_NEGATIVE, _POSITIVE, _Range
from jalign.data import fields
from jalign.losses import dpo_sft_term
from jalign.losses.ops import safe_divide
from jalign.roles import RoleSpec
from jalign.rollout import experience as xp


@dataclass
class OnlineDPOConfig(ScoredConfig):
    name: str = "online_dpo"
    num_rollouts_per_prompt: int = 2  # the pair is the best and the worst of these
    iterations: Optional[int] = None  # rounds over train.steps (None: every step samples from the current policy)
    reference: Literal["start", "previous"] = "start"
    min_margin: float = 0.0  # a pair counts only if score(chosen) - score(rejected) > min_margin
    # the DPO family, as in jalign.algorithms.dpo
    loss: Literal["dpo", "ipo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"] = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    eta: float = 1.0
    length_normalize: bool = False
    sft_weight: float = 0.0


VALUE_RANGES.setdefault("OnlineDPOConfig", {
    "iterations": _AT_LEAST_1, "min_margin": _NON_NEGATIVE, "beta": _POSITIVE, "eta": _POSITIVE,
    "label_smoothing": _Range(0, 0.5, hi_open=True), "sft_weight": _NON_NEGATIVE})

PAIR_FIELDS = {**{k: fields.PAIR_ROW for k in ROW_KEYS + ("loss_mask",)}, "valid": fields.PER_ROW,
               "rewards": fields.PER_PAIR_SIDE, "ref_logps": fields.PER_PAIR_SIDE}


def best_and_worst(keys, min_margin: float = 0.0):
    """keys [P, K] -> (chosen index [P], rejected index [P], valid [P]): the largest and the smallest key of each
    prompt (ties: the lower index), valid where they differ by more than ``min_margin``."""
    chosen, rejected = jnp.argmax(keys, axis=1), jnp.argmin(keys, axis=1)
    hi, lo = jnp.max(keys, axis=1), jnp.min(keys, axis=1)
    valid = (hi - lo > min_margin) & jnp.isfinite(hi)
    return chosen, rejected, valid.astype(jnp.float32)


def build_pairs(rows: dict, chosen, rejected, per_prompt: int) -> dict:
    """Rollout rows [P*K, S] -> pairs [P, 2, S] (side 0 = row chosen[p], side 1 = row rejected[p] of prompt p);
    ``mask`` becomes ``loss_mask`` as in ``jalign.data.preference``."""
    base = jnp.arange(chosen.shape[0]) * per_prompt
    both = jnp.stack([base + chosen, base + rejected], axis=1)
    pairs = {k: rows[k][both] for k in ROW_KEYS}
    pairs["loss_mask"] = rows["mask"][both]
    return pairs


def pair_loss(a, cfg, params, mb, norms):
    """The DPO-family loss of a pairwise batch carrying its reference log-prob sums (``ref_logps`` [b, 2]):
    preference loss over the valid pairs + ``a.sft_weight`` x token-mean NLL of the chosen responses."""
    sums, lp, mask = pair_sequence_logps(params, mb, cfg)
    pi_c, pi_r = sums[:, 0], sums[:, 1]
    ref_c, ref_r = mb["ref_logps"][:, 0], mb["ref_logps"][:, 1]
    if a.length_normalize:
        n_c, n_r = jnp.sum(mb["loss_mask"][:, 0], -1), jnp.sum(mb["loss_mask"][:, 1], -1)
        pi_c, pi_r = safe_divide(pi_c, n_c), safe_divide(pi_r, n_r)
        ref_c, ref_r = safe_divide(ref_c, n_c), safe_divide(ref_r, n_r)
    v = pair_valid(mb)
    pref, m = preference_loss(a, pi_c, pi_r, ref_c, ref_r, v, norms["num_pairs"], mb["rewards"][:, 0],
                              mb["rewards"][:, 1])
    lp_c, _ = unstack_pairs(lp)
    mask_c, mask_r = unstack_pairs(mask)
    sft, _ = dpo_sft_term(lp_c, mask_c * v[:, None], norms["num_chosen_tokens"])
    loss = pref + a.sft_weight * sft if a.sft_weight else pref
    m = dict(m, loss=loss, preference_loss=pref, sft_loss=sft, num_tokens=jnp.sum(v[:, None] * (mask_c + mask_r)),
             policy_accuracy=safe_divide(jnp.sum(v * (pi_c > pi_r)), norms["num_pairs"]))
    return loss, m


def pair_normalizers(batch):
    v = pair_valid(batch)
    return {"num_pairs": jnp.sum(v), "num_chosen_tokens": jnp.sum(v[..., None] * batch["loss_mask"][..., 0, :])}


@register("online_dpo", config=OnlineDPOConfig)
class OnlineDPO(GenTrainAlgorithm):
    rounds_key = "iterations"
    role_names = ("reference", "reward")
    fields = PAIR_FIELDS
    min_per_prompt = 2

    def __init__(self, rt):
        a, src = rt.cfg.algorithm, rt.cfg.source or "<config>"
        if a.num_rollouts_per_prompt < self.min_per_prompt:
            raise ConfigError(f"{src}: algorithm.num_rollouts_per_prompt={a.num_rollouts_per_prompt}: a pair needs "
                              f"at least {self.min_per_prompt} samples per prompt")
        if a.reference == "previous" and "reference" in rt.cfg.roles:
            raise ConfigError(f"{src}: roles.reference is set but algorithm.reference=previous rebuilds the "
                              "reference from the policy at every round: drop one of them")
        super().__init__(rt)
        self.setup_ranker()
        self._prepare = jax.jit(self._prepare_impl)
        self.generation_eval = self.generation_eval_for(reward=self.ranker_is_reward)

    ranker_is_reward = True

    def setup_ranker(self) -> None:
        self.setup_reward()

    def frozen_roles(self):
        specs = {"reward": RoleSpec(source=None, lm_head=False, score_outputs=-1, what="reward model")}
        if self.a.reference == "start":
            specs["reference"] = RoleSpec(what="reference model (the starting policy)")
        return specs

    def iterate_roles(self):
        return ("reference",) if self.a.reference == "previous" else super().iterate_roles()

    def generator(self, state, roles):
        if self.a.reference == "previous":  # the previous iterate samples the round's pairs
            return roles["reference"], self.gen_cfg
        return super().generator(state, roles)

    # ---- ranking: the reward model or the rule ---------------------------------------------------
    def rank_inputs(self, state, roles, batch, out) -> dict:
        """Host-side inputs of the ranking (device arrays): the rule's scores."""
        score = self.rule_scores(out, batch)
        return {} if score is None else {"rule_score": score}

    def rank(self, roles, rows, inputs):
        """Inside the preparation: (chosen [P], rejected [P], valid [P], scores [P, 2], metrics)."""
        s = self.sizes
        score = self.sequence_reward(roles, rows, inputs.get("rule_score"))
        keys = rank_key(score, rows["ended"], self.a.truncated_response).reshape(s.prompts, s.per_prompt)
        c, r, valid = best_and_worst(keys, self.a.min_margin)
        grouped = score.reshape(s.prompts, s.per_prompt)
        pair_scores = jnp.stack([jnp.take_along_axis(grouped, c[:, None], 1)[:, 0],
                                 jnp.take_along_axis(grouped, r[:, None], 1)[:, 0]], axis=1)
        metrics = {"reward_mean": jnp.mean(score), "reward_chosen_mean": safe_divide(
            jnp.sum(valid * pair_scores[:, 0]), jnp.sum(valid)), "reward_rejected_mean": safe_divide(
            jnp.sum(valid * pair_scores[:, 1]), jnp.sum(valid))}
        return c, r, valid, pair_scores, metrics

    def ranking_roles(self) -> tuple:
        return ("reward",)

    # ---- one step -------------------------------------------------------------------------------
    def learn(self, state, roles, batch, out):
        inputs = self.rank_inputs(state, roles, batch, out)
        names = [n for n in ("reference",) + self.ranking_roles() if n in roles]
        train, metrics = self._prepare(roles.on_device(names), out, inputs)
        self.log_rollouts(batch, out, train, extra={**inputs, **getattr(self, "log_extra", {})})
        state, m = self.update(state, roles, train)
        return state, {**metrics, **m}

    def _prepare_impl(self, roles, out, inputs):
        rows = xp.rollout_rows(out, self.tokenizer.pad_id)
        c, r, valid, pair_scores, metrics = self.rank(roles, rows, inputs)
        pairs = build_pairs(rows, c, r, self.sizes.per_prompt)
        ref, _, _ = pair_sequence_logps(roles["reference"], pairs, self.cfg.model)
        pairs.update(valid=valid, rewards=pair_scores, ref_logps=jax.lax.stop_gradient(ref))
        metrics.update(valid_pair_fraction=jnp.mean(valid), ended_with_eos=jnp.mean(rows["ended"]),
                       response_length=jnp.mean(rows["lengths"].astype(jnp.float32)))
        return self.to_train_batch(pairs), metrics

    def loss(self, params, mb, norms, roles):
        return pair_loss(self.a, self.cfg.model, params, mb, norms)

    @staticmethod
    def normalizers(batch):
        return pair_normalizers(batch)

    def empty_reason(self, metrics):
        return (f"no prompt's best and worst samples differed by more than algorithm.min_margin={self.a.min_margin} "
                "(ties of the ranker, or no sample ended within algorithm.max_new_tokens under "
                f"algorithm.truncated_response={self.a.truncated_response})")
