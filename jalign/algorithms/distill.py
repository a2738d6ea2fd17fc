"""Knowledge distillation from a teacher's top-k (NeMo-Aligner's KD): SFT data, a frozen ``teacher`` role.

    loss = kd_weight * KL_k(teacher || student) + sft_weight * NLL(data tokens)

KL_k is ``jalign.losses.kd_topk_loss`` (``kd_loss: fwd_kl``; ``bwd_kl`` is the reverse KL) on the teacher's
top-k token ids at each response position, both distributions renormalised over those k ids at
``temperature``; with k = the vocabulary it is the full KL. The student's log-probs at the k ids come from its
hidden states ``chunk`` positions at a time with a compare-and-sum over the vocabulary
(``jalign.losses.chunked_logps_at``): vocabulary-sharded logits are never gathered.

The teacher (``roles.teacher: run:DIR`` or ``hf:DIR``; any size, the same tokenizer and vocabulary) is

* ``teacher: precomputed`` -- run once over the train and eval sets at the start: its top-k ids and log-probs
  per token stored with tensorstore in ``RUN_DIR/teacher_topk`` (``[examples, longest, k]``), then released;
  batches get them by (example, position) of every token (``jalign.data.distill``), so packed rows work too;
  a rerun over the same data does not load the teacher at all;
* ``teacher: live`` -- a forward pass of the teacher in every step (its top-k on the fly).

Metrics: loss, kd_loss (the top-k KL, token mean), sft_loss, teacher_topk_mass / student_topk_mass (the
probability the k ids carry before renormalisation), num_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jalign.algorithms.base import LOGPROB_CHUNK, SupervisedAlgorithm
from jalign.algorithms.precompute import fill_columns
from jalign.algorithms.registry import register
from jalign.config import ConfigError
from jalign.config_values import VALUE_RANGES, _AT_LEAST_1, _NON_NEGATIVE, _POSITIVE
from jalign.data import fields
from jalign.data.columns import PrecomputedColumns
from jalign.data.distill import INDEX, DistillData, join_token_columns, records_fingerprint
from jalign.losses import (chunked_logps_at, chunked_token_logps, kd_topk_bwd_loss, kd_topk_loss, sft_loss,
                           teacher_topk)
from jalign.models import transformer as tfm
from jalign.roles import RoleSpec

STORE_DIR = "teacher_topk"
KD_LOSSES = {"fwd_kl": kd_topk_loss, "bwd_kl": kd_topk_bwd_loss}


@dataclass
class DistillConfig:
    name: str = "distill"
    top_k: int = 16  # teacher ids per position (NeMo-Aligner stores them in decreasing order)
    kd_weight: float = 1.0
    sft_weight: float = 0.0  # NLL of the data's own tokens
    temperature: float = 1.0
    kd_loss: Literal["fwd_kl", "bwd_kl"] = "fwd_kl"
    teacher: Literal["precomputed", "live"] = "precomputed"


VALUE_RANGES["DistillConfig"] = {"top_k": _AT_LEAST_1, "kd_weight": _NON_NEGATIVE, "sft_weight": _NON_NEGATIVE,
                                 "temperature": _POSITIVE}


def teacher_config(cfg):
    """The teacher's architecture (its own source's), checked against the student's vocabulary."""
    from jalign.models import load
    from jalign.roles import POLICY_INIT, role_architecture

    src = cfg.source or "<config>"
    if "teacher" not in cfg.roles:
        raise ConfigError(f"{src}: distill needs a teacher: roles.teacher=run:DIR (a jalign run) or hf:DIR")
    spec = cfg.roles["teacher"].source
    if spec == POLICY_INIT:
        return cfg.model
    source = load.parse_source(spec, where="roles.teacher")
    t = role_architecture(cfg, source, "roles.teacher")
    if t.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"roles.teacher={source}: vocab_size {t.vocab_size} differs from the student's "
                          f"{cfg.model.vocab_size}: teacher and student must share the tokenizer and vocabulary")
    return t


@register("distill", config=DistillConfig)
class Distill(SupervisedAlgorithm):
    role_names = ("teacher",)
    metric_counts = {}

    def __init__(self, rt):
        cfg = rt.cfg
        self.teacher_cfg = teacher_config(cfg)
        self.precomputed = cfg.algorithm.teacher == "precomputed"
        if cfg.algorithm.top_k > cfg.model.vocab_size:
            raise ConfigError(f"{cfg.source or '<config>'}: algorithm.top_k={cfg.algorithm.top_k} exceeds "
                              f"model.vocab_size={cfg.model.vocab_size}")
        self.step_roles = () if self.precomputed else ("teacher",)
        super().__init__(rt)
        k, width = self.a.top_k, self.data.longest
        self.columns = PrecomputedColumns(
            rt.run_dir / STORE_DIR, {"teacher_ids": ((width, k), "int32"), "teacher_logps": ((width, k), "float32")},
            self._fingerprint()) if self.precomputed and not rt.abstract else None
        self._topk_step = jax.jit(self._teacher_columns, out_shardings=NamedSharding(rt.mesh, PartitionSpec()))

    def role_specs(self):
        if self.precomputed and self.columns is not None and self.columns.ready():
            return {}  # the stored top-k stands in for the teacher: it is not even loaded
        return {"teacher": RoleSpec(source=None, what="teacher")}

    def make_data(self):
        return DistillData(self.cfg, self.tokenizer, log=self.rt.log)

    def batch_fields(self):
        # index / valid: the unpacked rows of the precompute pass
        return {**fields.distill_fields(self.precomputed), "index": fields.PER_ROW, "valid": fields.PER_ROW}

    def batch_trailing_dims(self):  # the stored top-k columns [B, T, K]
        return {k: (self.a.top_k,) for k in ("teacher_ids", "teacher_logps")} if self.precomputed else {}

    def programs(self):
        """The supervised programs, preceded (``teacher: precomputed``) by the teacher's one top-k pass over the
        data (``start``: ``fill_columns`` with ``_topk_step``), after which the teacher is released."""
        from jalign.abstract import Program

        progs = super().programs()
        if not self.precomputed:
            return progs
        roles, _, _ = self.abstract_roles()
        rows = self.cfg.train.global_batch
        placed = {**fields.SFT_FIELDS, "index": fields.PER_ROW, "valid": fields.PER_ROW}
        first = Program(self._topk_step, (roles["teacher"], self.abstract_batch(1, rows, placed)),
                        uses=("role:teacher",), releases=("role:teacher",),
                        note=f"{rows} rows x {self.cfg.data.seq_len}, top-{self.a.top_k}, once per run")
        return {"teacher_topk": first, **progs}

    # -- math --
    def _topk(self, teacher, rows):
        """The teacher's top-k ids and log-probs (temperature 1: the loss applies its own) [b, T, k]."""
        h = tfm.forward(teacher, rows["tokens"], rows["positions"], rows["segment_ids"], self.teacher_cfg)
        return teacher_topk(h, tfm.unembed_matrix(teacher, self.teacher_cfg), self.a.top_k, chunk_size=LOGPROB_CHUNK)

    def loss(self, params, mb, norms, roles):
        a, cfg = self.a, self.cfg.model
        if self.precomputed:
            ids, t_lp = mb["teacher_ids"], mb["teacher_logps"]
        else:
            ids, t_lp = jax.lax.stop_gradient(self._topk(roles["teacher"], mb))
        hidden = tfm.forward(params, mb["tokens"], mb["positions"], mb["segment_ids"], cfg)
        unembed = tfm.unembed_matrix(params, cfg)
        s_lp = chunked_logps_at(hidden, unembed, ids, chunk_size=LOGPROB_CHUNK)
        mask, n = mb["loss_mask"], norms["num_tokens"]
        kd, m = KD_LOSSES[a.kd_loss](s_lp, t_lp, mask, n, temperature=a.temperature)
        loss = a.kd_weight * kd
        nll = jnp.zeros((), jnp.float32)
        if a.sft_weight:
            nll, _ = sft_loss(chunked_token_logps(hidden, unembed, mb["targets"], LOGPROB_CHUNK), mask, n)
            loss = loss + a.sft_weight * nll
        return loss, dict(m, loss=loss, kd_loss=kd, sft_loss=nll)

    def normalizers(self, batch):
        return {"num_tokens": jnp.sum(batch["loss_mask"])}

    def eval_finish(self, means):
        means = dict(means)
        means["loss"] = self.a.kd_weight * means["kd_loss"] + self.a.sft_weight * means["sft_loss"]
        return means

    # -- the precomputed teacher --
    def _teacher_columns(self, teacher, batch):
        mb = jax.tree.map(lambda x: x[0], batch)
        ids, logps = self._topk(teacher, mb)
        width = self.data.longest
        return {"teacher_ids": ids[:, :width], "teacher_logps": logps[:, :width]}, mb["index"], mb["valid"]

    def _fingerprint(self) -> dict:
        d = self.data
        return {"kind": "distill_topk", "teacher": self.cfg.roles["teacher"].source, "top_k": self.a.top_k,
                "seq_len": self.cfg.data.seq_len,
                "train": [len(d.train_records), records_fingerprint(d.train_records)],
                "eval": [len(d.eval_records), records_fingerprint(d.eval_records)]}

    def start(self, state, roles):
        if self.precomputed:
            fill_columns(self, roles, "teacher", self.columns, self._topk_step,
                         {**fields.SFT_FIELDS, "index": fields.PER_ROW, "valid": fields.PER_ROW},
                         what=f"teacher top-{self.a.top_k}")

    def global_batch(self, host_batch, accum=None):
        return super().global_batch({k: v for k, v in host_batch.items() if k != INDEX}, accum)

    def prepare_batch(self, host_batch, split):
        if self.precomputed:
            return join_token_columns(self.columns, host_batch, split)
        return {k: v for k, v in host_batch.items() if k != INDEX}

