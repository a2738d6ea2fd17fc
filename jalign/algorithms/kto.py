"""KTO (Ethayarajh et al. 2024): unpaired completions labelled desirable / undesirable, no pairs needed.

Data: ``{"prompt", "completion", "label": true | false}`` (``jalign.data.unpaired``). Each example is a
[2, T] record: its completion, and the KL row (its prompt followed by another example's completion). Per
optimizer step:

* the reference point ``z0 = max(0, KL(pi || ref))`` is estimated on the KL rows of the *whole* optimizer
  batch, at the parameters before the update, without gradient (``batch_statistics``: one forward pass of
  the policy and the reference over the KL rows, Sec. 4.1 of the paper), so it does not depend on how the
  batch is split into micro-batches or devices;
* the loss is ``jalign.losses.kto_loss`` on the completions' log-prob sums with desirable / undesirable
  weights (``desirable_weight`` lambda_D, ``undesirable_weight`` lambda_U; the paper advises
  lambda_D n_D / (lambda_U n_U) in [1, 4/3]).

The reference is ``live`` (a forward pass of the ``reference`` role in the step) or ``precomputed``: the
log-prob sums of every completion and KL row are computed once at the start into ``RUN_DIR/reference_logps``
(``jalign.data.columns``), then the reference is released (and on a rerun over the same data not loaded).

With ``data.pack_pairs`` the [2, T] records (completion and KL row) are packed like preference pairs
(``jalign.algorithms.packed_pairs``); the sums are read per segment, the counts stay per example.

Metrics: loss, kl (z0), rewards_desirable / rewards_undesirable (beta * log-ratio, summed over that label /
all), desirable_fraction, accuracy (desirable above z0, undesirable below), num_seqs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jalign.algorithms.base import SupervisedAlgorithm, policy_token_logps
from jalign.algorithms.packed_pairs import PackedPairs, packed_pair_logps, pair_view
from jalign.algorithms.precompute import fill_reference_columns, join_columns, reference_pass_programs
from jalign.algorithms.registry import register
from jalign.config_values import VALUE_RANGES, _NON_NEGATIVE, _POSITIVE
from jalign.data import fields
from jalign.data.columns import PrecomputedColumns
from jalign.data.unpaired import UnpairedData, unpaired_fingerprint
from jalign.losses import kto_kl_estimate, kto_loss, sequence_logps
from jalign.roles import RoleSpec

LM_FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
STORE_DIR = "reference_logps"


@dataclass
class KTOConfig:
    name: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0  # lambda_D
    undesirable_weight: float = 1.0  # lambda_U
    reference: Literal["live", "precomputed"] = "live"  # precomputed: once, into RUN_DIR/reference_logps (zarr)


VALUE_RANGES["KTOConfig"] = {"beta": _POSITIVE, "desirable_weight": _NON_NEGATIVE,
                             "undesirable_weight": _NON_NEGATIVE}


def side(mb: dict, i: int) -> dict:
    """Rows of one side of the [b, 2, T] records: 0 = the completions, 1 = the mismatched KL rows."""
    return {k: mb[k][:, i] for k in LM_FIELDS}


def seq_sums(params, rows, cfg):
    """Per-sequence log-prob sums over the response tokens [b]."""
    return sequence_logps(policy_token_logps(params, rows, cfg), rows["loss_mask"])


def side_sums(params, mb, i: int, cfg):
    """Log-prob sums of side ``i`` [b]; a packed view (``jalign.algorithms.packed_pairs``) forwards its rows,
    both sides at once, and reads side ``i`` per segment."""
    if "rows" in mb:
        return packed_pair_logps(policy_token_logps(params, mb["rows"], cfg), mb)[0][:, i]
    return seq_sums(params, side(mb, i), cfg)


@register("kto", config=KTOConfig)
class KTO(PackedPairs, SupervisedAlgorithm):
    role_names = ("reference",)
    total_metrics = SupervisedAlgorithm.total_metrics + ("num_seqs",)

    def __init__(self, rt):
        self.precomputed = rt.cfg.algorithm.reference == "precomputed"
        self.step_roles = () if self.precomputed else ("reference",)
        super().__init__(rt)
        self.columns = PrecomputedColumns(rt.run_dir / STORE_DIR, {"ref_logps": ((2,), "float32")},
                                          self._fingerprint()) if self.precomputed and not rt.abstract else None
        self._ref_step = jax.jit(self._reference_sums, out_shardings=NamedSharding(rt.mesh, PartitionSpec()))

    def role_specs(self):
        specs = super().role_specs()  # under LoRA: the frozen base
        if self.precomputed and self.columns is not None and self.columns.ready():
            return specs  # the stored log-probs stand in for the reference: it is not even loaded
        if self.trainable.is_lora and "reference" not in self.cfg.roles:
            return specs  # the reference is the base with the adapters off: no second copy
        return {**specs, "reference": RoleSpec(what="reference model")}

    def make_data(self):
        return UnpairedData(self.cfg, self.tokenizer, log=self.rt.log)

    def batch_fields(self):
        extra = {"ref_logps": ("batch", None)} if self.precomputed else {}
        return self.pack_fields(fields.with_columns(fields.unpaired_fields(), extra))  # data.pack_pairs: packed

    # -- math --
    def _reference(self, mb, roles, i: int):
        """The reference's log-prob sums of side ``i`` (0 completions, 1 KL rows), [b], no gradient."""
        if self.precomputed:
            return mb["ref_logps"][:, i]
        return jax.lax.stop_gradient(side_sums(self.trainable.reference(roles), mb, i, self.cfg.model))

    @staticmethod
    def _valid(mb):
        """Real rows whose completion keeps a response token."""
        return mb["valid"] * (jnp.sum(mb["loss_mask"][..., 0, :], -1) > 0).astype(jnp.float32)

    def normalizers(self, batch):
        batch = pair_view(batch)  # packed rows -> per-row fields (unpacked batches pass through)
        return {"num_seqs": jnp.sum(self._valid(batch)), "num_kl": jnp.sum(self._valid(batch) * batch["kl_valid"])}

    def batch_statistics(self):
        def kl_point(params, roles, batch):
            """KTO's reference point over the whole batch [accum, micro, ...]: one forward-only pass per micro-batch."""
            view = pair_view(batch)
            n = jnp.sum(self._valid(view) * view["kl_valid"])

            def one(mb):
                mb = pair_view(mb)
                return kto_kl_estimate(side_sums(params, mb, 1, self.cfg.model), self._reference(mb, roles, 1),
                                       self._valid(mb) * mb["kl_valid"], n)

            return {"kto_kl": jnp.sum(jax.lax.map(one, batch))}

        return kl_point

    def loss(self, params, mb, norms, roles):
        a = self.a
        mb = pair_view(mb)
        pi = side_sums(params, mb, 0, self.cfg.model)
        loss, m = kto_loss(pi, self._reference(mb, roles, 0), mb["label"], norms["kto_kl"], self._valid(mb),
                           norms["num_seqs"], beta=a.beta, desirable_weight=a.desirable_weight,
                           undesirable_weight=a.undesirable_weight)
        m["num_tokens"] = jnp.sum(self._valid(mb)[:, None] * mb["loss_mask"][:, 0])
        return loss, m

    # -- the precomputed reference --
    def _reference_sums(self, params, batch):
        mb = jax.tree.map(lambda x: x[0], batch)
        sums = jnp.stack([seq_sums(params, side(mb, i), self.cfg.model) for i in (0, 1)], axis=-1)
        return {"ref_logps": sums}, mb["index"], mb["valid"]

    def _fingerprint(self) -> dict:
        m, d = self.cfg.model, self.data
        return {"kind": "kto", "init_from": m.init_from, "hf_path": m.hf_path, "seed": self.cfg.train.seed,
                "reference": self.cfg.roles["reference"].source if "reference" in self.cfg.roles else "policy-init",
                "seq_len": self.cfg.data.seq_len,
                "train": [len(d.train_records), unpaired_fingerprint(d.train_records)],
                "eval": [len(d.eval_records), unpaired_fingerprint(d.eval_records)]}

    def start(self, state, roles):
        if self.precomputed:
            fill_reference_columns(self, roles, fields.unpaired_fields())

    def prepare_batch(self, host_batch, split):
        return join_columns(self.columns, host_batch, split) if self.precomputed else host_batch

    # -- the run's programs (jalign plan) --
    def batch_trailing_dims(self):
        return {k: (2,) for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask", "ref_logps")}

    def programs(self):
        """The supervised programs, preceded by the reference pass when the reference is precomputed."""
        return reference_pass_programs(self, fields.unpaired_fields(), "examples (completion + KL row)")
