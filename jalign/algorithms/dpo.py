"""The DPO family over preference pairs, with an optional SFT term, selected by ``algorithm.loss``:

* with a frozen reference: DPO / cDPO (``dpo``), IPO, RPO (``rpo_sq``, ``rpo_fwd_kl``, ``rpo_bwd_kl``), SLiC
  (``slic``, hinge with ``margin``), robust DPO (``robust``, eps = ``label_smoothing``), APO (``apo_zero``,
  ``apo_down``), SPPO-hard (``sppo_hard``), NCA (``nca_pair``) and BCO (``bco_pair``, reward shift = the
  mean implicit reward of the optimizer batch at the parameters before the update);
* reference-free (no reference model is built or loaded at all): ORPO (``orpo``, lambda = ``beta``), SimPO
  (``simpo``, target margin ``gamma``) and CPO (``cpo``). ORPO and SimPO use length-averaged log-probs by
  definition; the papers' objectives include an NLL on the chosen response: ``sft_weight: 1`` for ORPO and CPO.

They share this file because they share everything but the formula: the data kind (pairs), the one forward
pass over both sides, the SFT term, metrics and evaluation; each formula is a pure function of
``jalign.losses`` (its paper in its docstring).

Policy and frozen reference start from the same weights by default (``roles.reference: policy-init``; any
``run:DIR`` / ``hf:DIR`` may be given instead). Chosen and rejected rows of a micro-batch go through the model
in one forward pass (``[b, 2, T] -> [2b, T]``). The reference is either

* ``reference: live`` -- a forward-only pass with the ``reference`` role inside the train step;
* ``reference: precomputed`` -- its per-sequence log-prob *sums* are computed once over the train and eval
  sets at the start (``jalign.data.columns``, stored in ``RUN_DIR/reference_logps``) and joined into each
  batch by example index; the reference role is then released. Means (``length_normalize``) are sums /
  response tokens in both modes, so the two give the same loss.

With ``data.pack_pairs``, whole pairs share rows of ``2 * data.seq_len`` tokens (segment ids keep every sequence
apart; ``jalign.algorithms.packed_pairs``): the loss reads per-sequence sums per segment and normalises by the
pairs the batch holds, so every loss above and every metric keeps its per-pair meaning.

Loss (``algorithm.loss``) = preference loss over valid pairs + ``sft_weight`` * token-mean NLL of the chosen
responses. Metrics (NeMo-Aligner names): loss, preference_loss, sft_loss, accuracy, rewards_chosen_mean,
rewards_rejected_mean, margin_mean, policy_accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jalign.algorithms.base import SupervisedAlgorithm, policy_token_logps
from jalign.algorithms.packed_pairs import PackedPairs, pair_view, packed_pair_logps
from jalign.algorithms.registry import register
from jalign.algorithms.reward import flatten_pairs, pair_valid, unstack_pairs
from jalign.data import fields
from jalign.data.columns import PrecomputedColumns
from jalign.data.preference import PairData, records_fingerprint
from jalign.algorithms.precompute import fill_reference_columns, join_columns, reference_pass_programs
from jalign.config import ConfigError
from jalign.config_values import VALUE_RANGES, _NON_NEGATIVE
from jalign.losses import (apo_down_loss, apo_zero_loss, bco_pair_loss, cpo_loss, dpo_loss, dpo_sft_term, ipo_loss,
                           nca_pair_loss, orpo_loss, robust_dpo_loss, rpo_bwd_kl_loss, rpo_fwd_kl_loss, rpo_sq_loss,
                           sequence_logps, simpo_loss, slic_loss, sppo_hard_loss)
from jalign.losses.ops import safe_divide
from jalign.roles import RoleSpec

PREFERENCE_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "rpo_sq": rpo_sq_loss, "rpo_fwd_kl": rpo_fwd_kl_loss,
                     "rpo_bwd_kl": rpo_bwd_kl_loss, "slic": slic_loss, "robust": robust_dpo_loss,
                     "apo_zero": apo_zero_loss, "apo_down": apo_down_loss, "sppo_hard": sppo_hard_loss,
                     "nca_pair": nca_pair_loss, "bco_pair": bco_pair_loss}
REFERENCE_FREE = ("orpo", "simpo", "cpo")
LENGTH_AVERAGED = ("orpo", "simpo")  # defined on length-averaged log-probs
LM_FIELDS = ("tokens", "targets", "positions", "segment_ids")
STORE_DIR = "reference_logps"


@dataclass
class DPOConfig:
    name: str = "dpo"
    loss: Literal["dpo", "ipo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl", "slic", "robust", "apo_zero", "apo_down",
                  "sppo_hard", "nca_pair", "bco_pair", "orpo", "simpo", "cpo"] = "dpo"
    beta: float = 0.1  # ORPO: its lambda
    label_smoothing: float = 0.0  # cDPO / SimPO / CPO: eps; robust: the label-flip rate
    eta: float = 1.0  # RPO: delta* = eta * (R_chosen - R_rejected)
    margin: float = 1.0  # SLiC: the hinge margin
    gamma: float = 0.5  # SimPO: the target reward margin (reward units)
    length_normalize: bool = False  # means instead of sums (ORPO and SimPO always use means)
    sft_weight: float = 0.0
    reference: Literal["live", "precomputed"] = "live"  # precomputed: once, into RUN_DIR/reference_logps (zarr)


VALUE_RANGES.setdefault("DPOConfig", {}).update(margin=_NON_NEGATIVE, gamma=_NON_NEGATIVE)


def preference_loss(a, pi_c, pi_r, ref_c, ref_r, valid, num_pairs, chosen_reward=None, rejected_reward=None,
                    delta_shift=None):
    """The configured reference-based loss with its own hyper-parameters from ``a`` (DPOConfig)."""
    fn = PREFERENCE_LOSSES[a.loss]
    if a.loss in ("dpo", "robust"):
        kw = dict(beta=a.beta, label_smoothing=a.label_smoothing)
    elif a.loss.startswith("rpo"):
        kw = dict(beta=a.beta, eta=a.eta, reward_chosen=chosen_reward, reward_rejected=rejected_reward)
    elif a.loss == "slic":
        kw = dict(beta=a.beta, margin=a.margin)
    elif a.loss == "bco_pair":
        kw = dict(beta=a.beta, delta_shift=delta_shift)
    else:
        kw = dict(beta=a.beta)
    return fn(pi_c, pi_r, ref_c, ref_r, valid, num_pairs, **kw)


def reference_free_loss(a, pi_c, pi_r, lp_c, mask_c, valid, num_pairs, num_tokens):
    """ORPO / SimPO / CPO on the policy's own log-probs (means for ORPO and SimPO, sums for CPO): the
    preference term only (the algorithm adds ``sft_weight`` * the chosen NLL itself)."""
    if a.loss == "orpo":
        _, m = orpo_loss(pi_c, pi_r, lp_c, mask_c, valid, num_pairs, num_tokens, lam=a.beta)
    elif a.loss == "simpo":
        _, m = simpo_loss(pi_c, pi_r, valid, num_pairs, beta=a.beta, gamma=a.gamma, label_smoothing=a.label_smoothing)
    else:
        _, m = cpo_loss(pi_c, pi_r, lp_c, mask_c, valid, num_pairs, num_tokens, beta=a.beta, nll_weight=0.0,
                        label_smoothing=a.label_smoothing)
    m = {k: v for k, v in m.items() if k not in ("nll_loss", "num_tokens")}
    return m["preference_loss"], m


def pair_sequence_logps(params, mb, cfg):
    """(per-sequence log-prob *sums* [b, 2], token log-probs [2b, T], masks [2b, T]) in one forward pass.
    A packed view (``jalign.algorithms.packed_pairs``) gives per-sequence means and counts [2b, 1] in place
    of the token-level arrays (the same sums of lp * mask and of mask)."""
    if "rows" in mb:
        return packed_pair_logps(policy_token_logps(params, mb["rows"], cfg), mb)
    both = flatten_pairs(mb, LM_FIELDS + ("loss_mask",))
    lp = policy_token_logps(params, both, cfg)
    sums = sequence_logps(lp, both["loss_mask"]).reshape(-1, 2)
    return sums, lp, both["loss_mask"]


@register("dpo", config=DPOConfig)
class DPO(PackedPairs, SupervisedAlgorithm):
    role_names = ("reference",)
    metric_counts = {"sft_loss": "num_chosen_tokens"}

    def __init__(self, rt):
        a, src = rt.cfg.algorithm, rt.cfg.source or "<config>"
        self.reference_free = a.loss in REFERENCE_FREE
        if self.reference_free and "reference" in rt.cfg.roles:
            raise ConfigError(f"{src}: roles.reference is set but algorithm.loss={a.loss} uses no reference model "
                              "(remove roles.reference, or choose a loss with a reference)")
        if self.reference_free and a.reference == "precomputed":
            raise ConfigError(f"{src}: algorithm.reference=precomputed but algorithm.loss={a.loss} uses no "
                              "reference model (leave algorithm.reference at its default)")
        self.precomputed = a.reference == "precomputed"
        self.step_roles = () if self.precomputed or self.reference_free else ("reference",)
        super().__init__(rt)
        self.columns = PrecomputedColumns(rt.run_dir / STORE_DIR, {"ref_logps": ((2,), "float32")},
                                          self._fingerprint()) if self.precomputed and not rt.abstract else None
        self._ref_step = jax.jit(self._reference_sums, out_shardings=NamedSharding(rt.mesh, PartitionSpec()))

    def role_specs(self):
        specs = super().role_specs()  # under LoRA: the frozen base
        if self.reference_free:
            return specs  # ORPO / SimPO / CPO: one model, the policy
        if self.precomputed and self.columns is not None and self.columns.ready():
            return specs  # the stored log-probs stand in for the reference: it is not even loaded
        if self.trainable.is_lora and "reference" not in self.cfg.roles:
            return specs  # the reference is the base with the adapters off: no second copy
        return {**specs, "reference": RoleSpec(what="reference model")}

    def make_data(self):
        return PairData(self.cfg, self.tokenizer, mode="lm", log=self.rt.log)

    def batch_fields(self):
        extra = {"ref_logps": ("batch", None)} if self.precomputed else {}
        return self.pack_fields(fields.with_columns(fields.pair_fields("lm"), extra))  # data.pack_pairs: packed

    # -- math --
    def _reference_logps(self, mb, roles):
        if self.precomputed:
            return mb["ref_logps"][:, 0], mb["ref_logps"][:, 1]
        sums, _, _ = pair_sequence_logps(self.trainable.reference(roles), mb, self.cfg.model)
        sums = jax.lax.stop_gradient(sums)
        return sums[:, 0], sums[:, 1]

    def _sequence_terms(self, params, mb, roles):
        """(pi_c, pi_r, ref_c, ref_r [b] (means where the loss is length-averaged), token log-probs [2b, T],
        masks [2b, T]); the reference terms are None for a reference-free loss."""
        a = self.a
        sums, lp, mask = pair_sequence_logps(params, mb, self.cfg.model)
        pi_c, pi_r = sums[:, 0], sums[:, 1]
        ref_c = ref_r = None
        if not self.reference_free:
            ref_c, ref_r = self._reference_logps(mb, roles)
        if a.length_normalize or a.loss in LENGTH_AVERAGED:
            n_c, n_r = jnp.sum(mb["loss_mask"][:, 0], -1), jnp.sum(mb["loss_mask"][:, 1], -1)
            pi_c, pi_r = safe_divide(pi_c, n_c), safe_divide(pi_r, n_r)
            if ref_c is not None:
                ref_c, ref_r = safe_divide(ref_c, n_c), safe_divide(ref_r, n_r)
        return pi_c, pi_r, ref_c, ref_r, lp, mask

    def loss(self, params, mb, norms, roles):
        a = self.a
        mb = pair_view(mb)  # packed rows -> per-pair fields (unpacked batches pass through)
        pi_c, pi_r, ref_c, ref_r, lp, mask = self._sequence_terms(params, mb, roles)
        v = pair_valid(mb)
        lp_c, _ = unstack_pairs(lp)
        mask_c, mask_r = unstack_pairs(mask)
        if self.reference_free:
            pref, m = reference_free_loss(a, pi_c, pi_r, lp_c, mask_c * v[:, None], v, norms["num_pairs"],
                                          norms["num_chosen_tokens"])
        else:
            pref, m = preference_loss(a, pi_c, pi_r, ref_c, ref_r, v, norms["num_pairs"], mb["rewards"][:, 0],
                                      mb["rewards"][:, 1], delta_shift=norms.get("bco_delta"))
        sft, _ = dpo_sft_term(lp_c, mask_c * v[:, None], norms["num_chosen_tokens"])
        loss = pref + a.sft_weight * sft if a.sft_weight else pref
        m = dict(m, loss=loss, preference_loss=pref, sft_loss=sft,
                 num_tokens=jnp.sum(v[:, None] * (mask_c + mask_r)))
        # reference-free: does the policy itself give the chosen response the higher log-prob?
        m["policy_accuracy"] = safe_divide(jnp.sum(v * (pi_c > pi_r)), norms["num_pairs"])
        return loss, m

    def batch_statistics(self):
        if self.a.loss != "bco_pair":
            return None

        def bco_shift(params, roles, batch):
            """BCO's reward shift: the mean implicit reward beta (a + b) / 2 over the optimizer batch, before the
            update (TRL updates its running mean with the batch before the loss; here the batch is the window)."""
            n = jnp.sum(pair_valid(pair_view(batch)))

            def one(mb):
                mb = pair_view(mb)
                pi_c, pi_r, ref_c, ref_r, _, _ = self._sequence_terms(params, mb, roles)
                return jnp.sum(pair_valid(mb) * 0.5 * self.a.beta * ((pi_c - ref_c) + (pi_r - ref_r)))

            return {"bco_delta": safe_divide(jnp.sum(jax.lax.map(one, batch)), n)}

        return bco_shift

    def normalizers(self, batch):
        batch = pair_view(batch)
        v = pair_valid(batch)
        return {"num_pairs": jnp.sum(v), "num_chosen_tokens": jnp.sum(v[..., None] * batch["loss_mask"][..., 0, :])}

    def eval_finish(self, means):
        means = dict(means)
        means["loss"] = means["preference_loss"] + self.a.sft_weight * means["sft_loss"]
        return means

    # -- the precomputed reference --
    def _reference_sums(self, params, batch):
        mb = jax.tree.map(lambda x: x[0], batch)
        sums, _, _ = pair_sequence_logps(params, mb, self.cfg.model)
        return {"ref_logps": sums}, mb["index"], mb["valid"]

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
        if self.precomputed:
            fill_reference_columns(self, roles, fields.pair_fields("lm"))

    def prepare_batch(self, host_batch, split):
        return join_columns(self.columns, host_batch, split) if self.precomputed else host_batch

    # -- the run's programs (jalign plan) --
    def batch_trailing_dims(self):  # [B, 2, T] pair sides, [B, 2] per-side columns
        return {k: (2,) for k, axes in {**fields.pair_fields("lm"), "ref_logps": ("batch", None)}.items()
                if None in axes}

    def programs(self):
        """The supervised programs, preceded by the reference pass when the reference is precomputed."""
        return reference_pass_programs(self, fields.pair_fields("lm"), "pairs")

