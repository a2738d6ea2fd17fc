"""Reward models: trunk + linear score head read at the last valid token.

* Pairwise (``loss: bt | bt_margin | bt_scaled``): chosen and rejected rows go through the model in
  one forward pass (stacked on the batch axis, ``[b, 2, T] -> [2b, T]``, which keeps every row on the
  device that holds its pair), one scalar per sequence, Bradley-Terry family losses over valid pairs.
  ``bt_margin`` uses ``m = margin_scale * (R_c - R_r)`` and ``bt_scaled`` ``s = margin_scale * (R_c - R_r)``
  with the data's ``chosen_reward`` / ``rejected_reward`` (1 / 0 when absent).
* Regression (``loss: regression``, data ``{"prompt", "response", "attributes": {...}}``): one output
  per attribute (``num_attributes``), masked MSE (SteerLM / HelpSteer2 / NeMo-Aligner style).

The model starts from ``model.init_from`` / ``model.hf_path`` (trunk copied, head freshly initialised).
``reward_scores`` is the pure scoring function other algorithms (PPO) call.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms import base
from jalign.data.preference import PairData, ScoredData
from jalign.losses import bt_loss, bt_margin_loss, bt_scaled_loss, regression_loss
from jalign.losses.ops import safe_divide
from jalign.models import transformer as tfm
from jalign.models.hf_heads import export_reward_model

PAIR_LOSSES = ("bt", "bt_margin", "bt_scaled")


# ---- pure helpers (shared with DPO / PPO) -------------------------------------------------------
def last_valid_index(segment_ids: jax.Array) -> jax.Array:
    """[B, T] -> [B] index of the last position with ``segment_ids > 0`` (0 for an all-padding row)."""
    T = segment_ids.shape[-1]
    pos = jnp.arange(T, dtype=jnp.int32)
    return jnp.max(jnp.where(segment_ids > 0, pos, 0), axis=-1)


def reward_scores(params, tokens, positions, segment_ids, cfg) -> jax.Array:
    """[B, A] float32 scores of each row, read at its last valid token (``segment_ids > 0``).

    Rows hold one sequence each (prompt + response, the final EOS included), right-padded. The read
    is a one-hot reduction over the sequence axis, so a sequence-sharded hidden state is never gathered.
    """
    hidden = tfm.forward(params, tokens, positions, segment_ids, cfg)
    scores = tfm.score_head(params, hidden)  # [B, T, A]
    last = last_valid_index(segment_ids)
    pick = (jnp.arange(tokens.shape[-1], dtype=jnp.int32)[None, :] == last[:, None]).astype(scores.dtype)
    return jnp.einsum("bta,bt->ba", scores, pick)


def stack_pairs(mb: dict, fields) -> dict:
    """``{f: [b, 2, ...] -> [2b, ...]}`` from ``chosen_f`` / ``rejected_f``: rows 2i / 2i+1 are pair i."""
    out = {}
    for f in fields:
        c, r = mb[f"chosen_{f}"], mb[f"rejected_{f}"]
        out[f] = jnp.stack([c, r], axis=1).reshape((2 * c.shape[0],) + c.shape[1:])
    return out


def unstack_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[2b, ...] -> (chosen [b, ...], rejected [b, ...])."""
    x = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
    return x[:, 0], x[:, 1]


def pair_valid(batch: dict, mask_field: str = "loss_mask") -> jax.Array:
    """``valid`` and both sides non-empty (a pair with an empty response never counts)."""
    has = lambda side: (jnp.sum(batch[f"{side}_{mask_field}"], axis=-1) > 0).astype(jnp.float32)  # noqa: E731
    return batch["valid"] * has("chosen") * has("rejected")


def start_report(algo, state, writer) -> dict:
    """At the start of a run: log the data counts (examples / truncated / dropped) of the train split at
    step 0, and on a fresh run (step 0) evaluate the starting model, so "before" numbers are in the log."""
    out = {}
    for spec, counts in algo.data.counts.items():
        split = "train" if spec == algo.rt.cfg.data.train else "eval"
        out.update({f"data/{split}_{k}": float(v) for k, v in counts.items()})
    writer.write(int(jax.device_get(state["step"])), out)
    if int(jax.device_get(state["step"])) == 0 and algo.rt.cfg.train.eval_every:
        ev = algo.evaluate(state)
        writer.write(0, ev, prefix="eval/")
        writer.message("step 0: " + ", ".join(f"eval/{k}={v:.4g}" for k, v in ev.items()))
        out.update({f"eval/{k}": v for k, v in ev.items()})
    return out


# ---- the algorithm ------------------------------------------------------------------------------
@base.register("reward")
class RewardModel(base.TrainedOnData):
    def __init__(self, rt: base.Runtime):
        cfg, a = rt.cfg, rt.cfg.algorithm
        self.pairwise = a.loss in PAIR_LOSSES
        if self.pairwise and a.num_attributes != 1:
            raise ValueError(f"algorithm.loss={a.loss} trains one scalar reward: set algorithm.num_attributes=1 "
                             f"(got {a.num_attributes}); multi-attribute models use loss: regression")
        self.setup_training(rt, tfm.declare_params(cfg.model, lm_head=False, score_outputs=a.num_attributes))
        loss_fn = self.pair_loss_fn if self.pairwise else self.regression_loss_fn
        norms = self.pair_normalizers if self.pairwise else self.regression_normalizers
        self._train_step = base.make_train_step(loss_fn, norms, self.optimizer, self.schedule, self.shardings,
                                                rt.mesh)
        self._eval_step = jax.jit(self._eval_sums)
        if self.pairwise:
            self.data = PairData(cfg, self.tokenizer, mode="score", log=rt.log)
        else:
            self.data = ScoredData(cfg, self.tokenizer, num_attributes=a.num_attributes, log=rt.log)

    # -- math --
    def _pair_rewards(self, params, mb):
        both = stack_pairs(mb, ("tokens", "positions", "segment_ids"))
        r = reward_scores(params, both["tokens"], both["positions"], both["segment_ids"], self.rt.cfg.model)
        return unstack_pairs(r[:, 0])

    def pair_loss_fn(self, params, mb, norms, frozen):
        a = self.rt.cfg.algorithm
        r_c, r_r = self._pair_rewards(params, mb)
        v, n = pair_valid(mb), norms["num_pairs"]
        strength = a.margin_scale * (mb["chosen_reward"] - mb["rejected_reward"])
        if a.loss == "bt":
            loss, m = bt_loss(r_c, r_r, v, n)
        elif a.loss == "bt_margin":
            loss, m = bt_margin_loss(r_c, r_r, strength, v, n)
        else:
            loss, m = bt_scaled_loss(r_c, r_r, strength, v, n)
        rc, rr = jnp.where(v > 0, r_c, 0.0), jnp.where(v > 0, r_r, 0.0)
        m["reward_sq_mean"] = safe_divide(jnp.sum(v * (rc * rc + rr * rr)) / 2, n)  # for reward_std
        m["num_tokens"] = jnp.sum(v[:, None] * (mb["chosen_loss_mask"] + mb["rejected_loss_mask"]))
        return loss, m

    @staticmethod
    def pair_normalizers(batch):
        return {"num_pairs": jnp.sum(pair_valid(batch))}

    def _attr(self, mb):
        A = self.rt.cfg.algorithm.num_attributes
        target = jnp.stack([mb[f"attr_value_{i}"] for i in range(A)], axis=-1)
        mask = jnp.stack([mb[f"attr_mask_{i}"] for i in range(A)], axis=-1) * mb["valid"][..., None]
        return target, mask

    def regression_loss_fn(self, params, mb, norms, frozen):
        pred = reward_scores(params, mb["tokens"], mb["positions"], mb["segment_ids"], self.rt.cfg.model)
        target, mask = self._attr(mb)
        loss, m = regression_loss(pred, target, mask, norms["num_values"], norms["num_values_per_attr"])
        m["num_tokens"] = jnp.sum(mb["valid"][:, None] * mb["loss_mask"])
        return loss, m

    def regression_normalizers(self, batch):
        _, mask = self._attr(batch)
        return {"num_values": jnp.sum(mask), "num_values_per_attr": jnp.sum(mask, axis=tuple(range(mask.ndim - 1)))}

    def _eval_sums(self, params, batch):
        """Per-batch *sums* (losses called with unit divisors), divided by the counts on the host."""
        mb = jax.tree.map(lambda x: x[0], batch)
        if self.pairwise:
            _, m = self.pair_loss_fn(params, mb, {"num_pairs": 1.0}, None)
            return m
        A = self.rt.cfg.algorithm.num_attributes
        _, m = self.regression_loss_fn(params, mb, {"num_values": 1.0, "num_values_per_attr": jnp.ones(A)}, None)
        _, mask = self._attr(mb)
        m["per_attr_count"] = jnp.sum(mask, axis=0)
        return m

    @staticmethod
    def _with_std(m: dict) -> dict:
        m = dict(m)
        if "reward_sq_mean" in m:
            mean = (m["reward_chosen_mean"] + m["reward_rejected_mean"]) / 2
            m["reward_std"] = jnp.sqrt(jnp.maximum(m.pop("reward_sq_mean") - mean * mean, 0.0))
        return m

    # -- protocol (init, abstract_state, batches: base.TrainedOnData) --
    def step(self, state, batch):
        state, m = self._train_step(state, self.global_batch(batch), None)
        return state, self._with_std(m)

    def on_start(self, state, writer) -> dict:
        return start_report(self, state, writer)

    def evaluate(self, state) -> dict:
        if not self.data.has_eval:
            return {}
        sums: dict = {}
        for i, batch in enumerate(self.data.eval_iterator()):
            if i >= self.rt.cfg.train.eval_batches:
                break
            m = self._eval_step(state["params"], self.global_batch(batch, accum=1))
            for k, v in jax.device_get(m).items():
                sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
        if self.pairwise:
            n = max(float(sums["num_pairs"]), 1.0)
            out = {k: float(sums[k]) / n for k in ("loss", "accuracy", "reward_chosen_mean", "reward_rejected_mean",
                                                   "margin_mean", "reward_sq_mean")}
            out = {k: float(v) for k, v in self._with_std(out).items()}
            out["num_pairs"] = float(sums["num_pairs"])
            return out
        n = max(float(sums["num_values"]), 1.0)
        out = {"loss": float(sums["loss"]) / n, "mae": float(sums["mae"]) / n}
        counts = np.maximum(sums["per_attr_count"], 1.0)
        for a, name in enumerate(self.data.attribute_names):
            out[f"mae_{name}"] = float(sums[f"mae_attr_{a}"]) / float(counts[a])
        return out

    def export(self, state, out_dir: str) -> None:
        export_reward_model(state["params"], self.rt.cfg.model, out_dir, self.rt.cfg.algorithm,
                            attribute_names=getattr(self.data, "attribute_names", None) or ["reward"],
                            tokenizer_dir=self.data.tokenizer_dir(), pad_id=self.tokenizer.pad_id)
