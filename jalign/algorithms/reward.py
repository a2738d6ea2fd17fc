"""Reward models: trunk + linear score head read at the last valid token.

* Pairwise (``loss: bt | bt_margin | bt_scaled``): chosen and rejected rows go through the model in one
  forward pass (``[b, 2, T] -> [2b, T]``, which keeps every row on the device that holds its pair), one
  scalar per sequence, Bradley-Terry family losses over valid pairs. ``bt_margin`` uses
  ``m = margin_scale * (R_c - R_r)`` and ``bt_scaled`` ``s = margin_scale * (R_c - R_r)`` with the data's
  ``chosen_reward`` / ``rejected_reward`` (1 / 0 when absent).
* Regression (``loss: regression``, data ``{"prompt", "response", "attributes": {...}}``): one output per
  attribute (``num_attributes``), masked MSE (SteerLM / HelpSteer2 / NeMo-Aligner style).

The model starts from the policy's source (``model.init_from`` / ``model.hf_path``): trunk copied, the score
head (which an SFT policy lacks) freshly initialised.

Both may be packed (``data.pack_pairs``, ``jalign.algorithms.packed_pairs``): whole pairs, or scored sequences,
share rows, each sequence scored at the last token of its segment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

from jalign.algorithms.base import SupervisedAlgorithm
from jalign.algorithms.packed_pairs import PackedPairs, is_packed, packed_pair_scores, pair_view
from jalign.algorithms.registry import register
from jalign.config import ConfigError
from jalign.data import fields
from jalign.data.preference import PairData, ScoredData
from jalign.losses import bt_loss, bt_margin_loss, bt_scaled_loss, regression_loss
from jalign.losses.ops import safe_divide
from jalign.models import transformer as tfm
from jalign.models.heads import packed_segment_scores, segment_sums, sequence_scores

PAIR_LOSSES = ("bt", "bt_margin", "bt_scaled")
PAIR_LOSS_FNS = {"bt": bt_loss, "bt_margin": bt_margin_loss, "bt_scaled": bt_scaled_loss}


@dataclass
class RewardConfig:
    name: str = "reward"
    loss: Literal["bt", "bt_margin", "bt_scaled", "regression"] = "bt"
    num_attributes: int = 1
    margin_scale: float = 1.0  # bt_margin: m = scale * (R_c - R_r); bt_scaled: s = scale * (R_c - R_r) (data rewards)


# ---- pure helpers (shared with DPO) -------------------------------------------------------------
def flatten_pairs(mb: dict, names) -> dict:
    """``{f: [b, 2, ...] -> [2b, ...]}``: rows 2i / 2i+1 are the chosen / rejected side of pair i, so one
    forward pass scores both (a reshape of the batch-sharded pair axis: no data moves between devices)."""
    return {f: mb[f].reshape((2 * mb[f].shape[0],) + mb[f].shape[2:]) for f in names}


def unstack_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[2b, ...] -> (chosen [b, ...], rejected [b, ...])."""
    x = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
    return x[:, 0], x[:, 1]


def pair_valid(batch: dict) -> jax.Array:
    """``valid`` and both sides non-empty (a pair with an empty response never counts); [..., b]."""
    both = jnp.all(jnp.sum(batch["loss_mask"], axis=-1) > 0, axis=-1)  # [..., b, 2, T] -> [..., b]
    return batch["valid"] * both.astype(jnp.float32)


# ---- the algorithm ------------------------------------------------------------------------------
@register("reward", config=RewardConfig)
class RewardModel(PackedPairs, SupervisedAlgorithm):
    lm_head = False
    allow_fresh = ("score", "score_bias")

    def __init__(self, rt):
        a = rt.cfg.algorithm
        self.pairwise = a.loss in PAIR_LOSSES
        if self.pairwise and a.num_attributes != 1:
            raise ConfigError(f"algorithm.loss={a.loss} trains one scalar reward: set algorithm.num_attributes=1 "
                              f"(got {a.num_attributes}); multi-attribute models use loss: regression")
        super().__init__(rt)

    def declare(self):
        return tfm.declare_params(self.cfg.model, lm_head=False, score_outputs=self.a.num_attributes)

    def make_data(self):
        if self.pairwise:
            return PairData(self.cfg, self.tokenizer, mode="score", log=self.rt.log)
        return ScoredData(self.cfg, self.tokenizer, num_attributes=self.a.num_attributes, log=self.rt.log)

    def batch_fields(self):
        return self.pack_fields(fields.pair_fields("score") if self.pairwise else fields.scored_fields())

    def batch_trailing_dims(self):  # jalign plan: the 2 sides of a pair, the attributes of a scored row
        if self.pairwise:
            return {k: (2,) for k, axes in fields.pair_fields("score").items() if None in axes}
        return {"attributes": (self.a.num_attributes,), "attribute_mask": (self.a.num_attributes,)}

    def eval_examples(self, with_texts: bool = False):
        return []  # a reward model does not generate

    # -- math --
    def loss(self, params, mb, norms, roles):
        return self._pair_loss(params, mb, norms) if self.pairwise else self._regression_loss(params, mb, norms)

    def normalizers(self, batch):
        if self.pairwise:
            return {"num_pairs": jnp.sum(pair_valid(pair_view(batch)))}
        _, mask = self._attr(batch)
        return {"num_values": jnp.sum(mask), "num_values_per_attr": jnp.sum(mask, axis=tuple(range(mask.ndim - 1)))}

    def _pair_loss(self, params, mb, norms):
        a = self.a
        mb = pair_view(mb)  # packed rows -> per-pair fields (unpacked batches pass through)
        if "rows" in mb:
            r = packed_pair_scores(params, mb, self.cfg.model)
            r_c, r_r = r[:, 0], r[:, 1]
        else:
            both = flatten_pairs(mb, ("tokens", "positions", "segment_ids"))
            r = sequence_scores(params, both["tokens"], both["positions"], both["segment_ids"], self.cfg.model)
            r_c, r_r = unstack_pairs(r[:, 0])
        v, n = pair_valid(mb), norms["num_pairs"]
        fn = PAIR_LOSS_FNS[a.loss]
        if a.loss == "bt":
            loss, m = fn(r_c, r_r, v, n)
        else:
            loss, m = fn(r_c, r_r, a.margin_scale * (mb["rewards"][:, 0] - mb["rewards"][:, 1]), v, n)
        rc, rr = jnp.where(v > 0, r_c, 0.0), jnp.where(v > 0, r_r, 0.0)
        m["reward_sq_mean"] = safe_divide(jnp.sum(v * (rc * rc + rr * rr)) / 2, n)  # for reward_std
        m["num_tokens"] = jnp.sum(v[:, None, None] * mb["loss_mask"])
        return loss, m

    @staticmethod
    def _attr(mb):
        return mb["attributes"], mb["attribute_mask"] * mb["valid"][..., None]

    def _regression_loss(self, params, mb, norms):
        target, mask = self._attr(mb)
        if is_packed(mb):  # rows [R, T] of K scored sequences (segment k+1), tables [R, K, A]
            K, A = mb["valid"].shape[-1], target.shape[-1]
            pred = packed_segment_scores(params, mb["tokens"], mb["positions"], mb["segment_ids"], self.cfg.model, K)
            pred, target, mask = pred.reshape(-1, A), target.reshape(-1, A), mask.reshape(-1, A)
            counts = segment_sums(mb["loss_mask"], mb["segment_ids"], K)  # [R, K]
            num_tokens = jnp.sum(mb["valid"] * counts)
        else:
            pred = sequence_scores(params, mb["tokens"], mb["positions"], mb["segment_ids"], self.cfg.model)
            num_tokens = jnp.sum(mb["valid"][:, None] * mb["loss_mask"])
        loss, m = regression_loss(pred, target, mask, norms["num_values"], norms["num_values_per_attr"])
        m["num_tokens"] = num_tokens
        return loss, m

    # -- metrics --
    def step(self, state, roles, batch):
        state, m = super().step(state, roles, batch)
        return state, with_std(m)

    def _eval_sums(self, params, roles, batch):
        if self.pairwise:
            return super()._eval_sums(params, roles, batch)
        mb = jax.tree.map(lambda x: x[0], batch)
        norms = self.normalizers(batch)
        A = self.a.num_attributes
        _, m = self._regression_loss(params, mb, {"num_values": 1.0, "num_values_per_attr": jnp.ones(A)})
        out = {"loss": (m["loss"], norms["num_values"]), "mae": (m["mae"], norms["num_values"])}
        for i, name in enumerate(self.data.attribute_names):
            out[f"mae_{name}"] = (m[f"mae_attr_{i}"], norms["num_values_per_attr"][i])
        return out

    def eval_finish(self, means):
        means = {k: v for k, v in means.items() if k not in ("num_tokens",)}
        return {k: float(v) for k, v in with_std(means).items()}

    def export(self, state, roles, out_dir):
        from jalign.models.hf_heads import export_reward_model

        export_reward_model(self.trainable.merged(state.params, roles), self.cfg.model, out_dir, self.a,
                            attribute_names=getattr(self.data, "attribute_names", None) or ["reward"],
                            tokenizer_dir=self.tokenizer_dir(), pad_id=self.tokenizer.pad_id)
        self.export_adapter(state, out_dir)


def with_std(m: dict) -> dict:
    """``reward_std`` from the pairwise mean of squares and the two means."""
    m = dict(m)
    if "reward_sq_mean" in m:
        mean = (m["reward_chosen_mean"] + m["reward_rejected_mean"]) / 2
        m["reward_std"] = jnp.sqrt(jnp.maximum(m.pop("reward_sq_mean") - mean * mean, 0.0))
    return m
