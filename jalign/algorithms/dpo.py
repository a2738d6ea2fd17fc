"""The DPO family: DPO / cDPO, IPO, RPO (squared, forward-KL, backward-KL), with an optional SFT term.

Policy and frozen reference start from the same weights by default (``roles.reference: policy-init``; any
``run:DIR`` / ``hf:DIR`` may be given instead). Chosen and rejected rows of a micro-batch go through the model
in one forward pass (``[b, 2, T] -> [2b, T]``). The reference is either

* ``reference: live`` -- a forward-only pass with the ``reference`` role inside the train step;
* ``reference: precomputed`` -- its per-sequence log-prob *sums* are computed once over the train and eval
  sets at the start (``jalign.data.columns``, stored in ``RUN_DIR/reference_logps``) and joined into each
  batch by example index; the reference role is then released. Means (``length_normalize``) are sums /
  response tokens in both modes, so the two give the same loss.

Loss (``algorithm.loss``) = preference loss over valid pairs + ``sft_weight`` * token-mean NLL of the chosen
responses. Metrics (NeMo-Aligner names): loss, preference_loss, sft_loss, accuracy, rewards_chosen_mean,
rewards_rejected_mean, margin_mean, policy_accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jalign.algorithms.base import SupervisedAlgorithm, policy_token_logps
from jalign.algorithms.registry import register
from jalign.algorithms.reward import pair_valid, stack_pairs, unstack_pairs
from jalign.data import fields
from jalign.data.columns import PrecomputedColumns
from jalign.data.preference import PairData, records_fingerprint
from jalign.losses import (dpo_loss, dpo_sft_term, ipo_loss, rpo_bwd_kl_loss, rpo_fwd_kl_loss, rpo_sq_loss,
                           sequence_logps)
from jalign.losses.ops import safe_divide
from jalign.roles import RoleSpec

PREFERENCE_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "rpo_sq": rpo_sq_loss, "rpo_fwd_kl": rpo_fwd_kl_loss,
                     "rpo_bwd_kl": rpo_bwd_kl_loss}
LM_FIELDS = ("tokens", "targets", "positions", "segment_ids")
STORE_DIR = "reference_logps"


@dataclass
class DPOConfig:
    name: str = "dpo"
    loss: Literal["dpo", "ipo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"] = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    eta: float = 1.0  # RPO: delta* = eta * (R_chosen - R_rejected)
    length_normalize: bool = False
    sft_weight: float = 0.0
    reference: Literal["live", "precomputed"] = "live"  # precomputed: once, into RUN_DIR/reference_logps (zarr)


def preference_loss(a, pi_c, pi_r, ref_c, ref_r, valid, num_pairs, chosen_reward=None, rejected_reward=None):
    """The configured loss of :mod:`jalign.losses.dpo` with its own hyper-parameters from ``a`` (DPOConfig)."""
    fn = PREFERENCE_LOSSES[a.loss]
    if a.loss == "dpo":
        kw = dict(beta=a.beta, label_smoothing=a.label_smoothing)
    elif a.loss == "ipo":
        kw = dict(beta=a.beta)
    else:
        kw = dict(beta=a.beta, eta=a.eta, reward_chosen=chosen_reward, reward_rejected=rejected_reward)
    return fn(pi_c, pi_r, ref_c, ref_r, valid, num_pairs, **kw)


def pair_sequence_logps(params, mb, cfg):
    """(per-sequence log-prob *sums* [b, 2], token log-probs [2b, T], masks [2b, T]) in one forward pass."""
    both = stack_pairs(mb, LM_FIELDS + ("loss_mask",))
    lp = policy_token_logps(params, both, cfg)
    sums = sequence_logps(lp, both["loss_mask"]).reshape(-1, 2)
    return sums, lp, both["loss_mask"]


@register("dpo", config=DPOConfig)
class DPO(SupervisedAlgorithm):
    role_names = ("reference",)
    metric_counts = {"sft_loss": "num_chosen_tokens"}

    def __init__(self, rt):
        self.precomputed = rt.cfg.algorithm.reference == "precomputed"
        self.step_roles = () if self.precomputed else ("reference",)
        super().__init__(rt)
        self.columns = PrecomputedColumns(rt.run_dir / STORE_DIR, {"ref_logps": ((2,), "float32")},
                                          self._fingerprint()) if self.precomputed and not rt.abstract else None
        self._ref_step = jax.jit(self._reference_sums, out_shardings=NamedSharding(rt.mesh, PartitionSpec()))

    def role_specs(self):
        if self.precomputed and self.columns is not None and self.columns.ready():
            return {}  # the stored log-probs stand in for the reference: it is not even loaded
        return {"reference": RoleSpec(what="reference model")}

    def make_data(self):
        return PairData(self.cfg, self.tokenizer, mode="lm", log=self.rt.log)

    def batch_fields(self):
        extra = {"ref_logps": ("batch", None)} if self.precomputed else {}
        return fields.with_columns(fields.pair_fields("lm"), extra)

    # -- math --
    def _reference_logps(self, mb, roles):
        if self.precomputed:
            return mb["ref_logps"][:, 0], mb["ref_logps"][:, 1]
        sums, _, _ = pair_sequence_logps(roles["reference"], mb, self.cfg.model)
        sums = jax.lax.stop_gradient(sums)
        return sums[:, 0], sums[:, 1]

    def loss(self, params, mb, norms, roles):
        a = self.a
        sums, lp, mask = pair_sequence_logps(params, mb, self.cfg.model)
        ref_c, ref_r = self._reference_logps(mb, roles)
        pi_c, pi_r = sums[:, 0], sums[:, 1]
        if a.length_normalize:
            n_c, n_r = jnp.sum(mb["chosen_loss_mask"], -1), jnp.sum(mb["rejected_loss_mask"], -1)
            pi_c, pi_r = safe_divide(pi_c, n_c), safe_divide(pi_r, n_r)
            ref_c, ref_r = safe_divide(ref_c, n_c), safe_divide(ref_r, n_r)
        v = pair_valid(mb)
        pref, m = preference_loss(a, pi_c, pi_r, ref_c, ref_r, v, norms["num_pairs"], mb["chosen_reward"],
                                  mb["rejected_reward"])
        lp_c, _ = unstack_pairs(lp)
        mask_c, mask_r = unstack_pairs(mask)
        sft, _ = dpo_sft_term(lp_c, mask_c * v[:, None], norms["num_chosen_tokens"])
        loss = pref + a.sft_weight * sft if a.sft_weight else pref
        m = dict(m, loss=loss, preference_loss=pref, sft_loss=sft,
                 num_tokens=jnp.sum(v[:, None] * (mask_c + mask_r)))
        # reference-free: does the policy itself give the chosen response the higher log-prob?
        m["policy_accuracy"] = safe_divide(jnp.sum(v * (pi_c > pi_r)), norms["num_pairs"])
        return loss, m

    def normalizers(self, batch):
        v = pair_valid(batch)
        return {"num_pairs": jnp.sum(v), "num_chosen_tokens": jnp.sum(v[..., None] * batch["chosen_loss_mask"])}

    def eval_finish(self, means):
        means = dict(means)
        means["loss"] = means["preference_loss"] + self.a.sft_weight * means["sft_loss"]
        return means

    # -- the precomputed reference --
    def _reference_sums(self, params, batch):
        mb = jax.tree.map(lambda x: x[0], batch)
        sums, _, _ = pair_sequence_logps(params, mb, self.cfg.model)
        return sums, mb["index"], mb["valid"]

    def _fingerprint(self) -> dict:
        m, d = self.cfg.model, self.data
        return {"init_from": m.init_from, "hf_path": m.hf_path, "seed": self.cfg.train.seed,
                "reference": self.cfg.roles["reference"].source if "reference" in self.cfg.roles else "policy-init",
                "seq_len": self.cfg.data.seq_len,
                "train": [len(d.train_records), records_fingerprint(d.train_records)],
                "eval": [len(d.eval_records), records_fingerprint(d.eval_records)]}

    def start(self, state, roles):
        """With ``reference: precomputed``: fill (or reuse) the stored reference log-probs, then release the
        reference role."""
        if not self.precomputed:
            return
        if "reference" in roles:
            ref = roles.on_device(["reference"])["reference"]
            pair_fields = fields.pair_fields("lm")

            def fn(batch):
                placed = {k: v for k, v in batch.items() if k in pair_fields}
                sums, index, valid = jax.device_get(self._ref_step(ref, self.global_batch(placed, accum=1)))
                return {"ref_logps": np.asarray(sums)}, index, valid

            splits = {s: (len(r), self.data.ordered(s)) for s, r in (("train", self.data.train_records),
                                                                         ("eval", self.data.eval_records)) if r}
            self.columns.compute(splits, fn, writer=jax.process_index() == 0, sync=_sync)
            self.rt.log(f"reference log-probs precomputed into {self.columns.directory} "
                        f"({', '.join(f'{s}: {n}' for s, (n, _) in splits.items())} pairs)")
        roles.drop("reference")  # no longer needed: the stored values replace it

    def prepare_batch(self, host_batch, split):
        return self.columns.join(host_batch, split) if self.precomputed else host_batch

    # -- the run's programs (jalign plan) --
    def batch_trailing_dims(self):
        return {"ref_logps": (2,)}

    def programs(self):
        """The supervised programs, preceded by the reference pass when the reference is precomputed (the
        reference role is released after it)."""
        from jalign.abstract import Program

        progs = super().programs()
        if not self.precomputed:
            return progs
        roles, _, _ = self.abstract_roles()
        rows = self.cfg.train.global_batch
        batch = self.abstract_batch(1, rows, fields.pair_fields("lm"))
        first = Program(self._ref_step, (roles["reference"], batch), uses=("role:reference",),
                        releases=("role:reference",), note=f"{rows} pairs x {self.cfg.data.seq_len}, once per run")
        return {"reference_logps": first, **progs}


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

