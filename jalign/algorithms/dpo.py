"""The DPO family: DPO / cDPO, IPO, RPO (squared, forward-KL, backward-KL), with an optional SFT term.

Policy and frozen reference start from the same weights (``model.init_from`` / ``model.hf_path`` /
the random init of ``train.seed``). Chosen and rejected rows of a micro-batch go through the model in
one forward pass (``[b, 2, T] -> [2b, T]``). The reference is either

* ``reference: live`` -- a second (forward-only) pass with the reference params, which enter the
  jitted step as its ``frozen`` argument: never differentiated, never in the optimizer, never donated;
* ``reference: precomputed`` -- its per-sequence log-prob *sums* are computed once over the train and
  eval sets before the first step and stored with tensorstore (zarr) in ``RUN_DIR/reference_logps``,
  keyed by example index; each batch reads its rows back. The reference params are then released.
  Means (``length_normalize``) are sums / response tokens in both modes, so the two give the same loss.

Loss (``algorithm.loss``) = preference loss over valid pairs + ``sft_weight`` * token-mean NLL of the
chosen responses. Metrics (NeMo-Aligner names): loss, preference_loss, sft_loss, accuracy,
rewards_chosen_mean, rewards_rejected_mean, margin_mean.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jalign.algorithms import base
from jalign.algorithms.base import policy_token_logps
from jalign.algorithms.evaluation import ExactMatchEval
from jalign.algorithms.reward import pair_valid, stack_pairs, start_report, unstack_pairs
from jalign.data.preference import PairData, records_fingerprint
from jalign.losses import (dpo_loss, dpo_sft_term, ipo_loss, rpo_bwd_kl_loss, rpo_fwd_kl_loss, rpo_sq_loss,
                           sequence_logps)
from jalign.losses.ops import safe_divide
from jalign.models import transformer as tfm

PREFERENCE_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "rpo_sq": rpo_sq_loss, "rpo_fwd_kl": rpo_fwd_kl_loss,
                     "rpo_bwd_kl": rpo_bwd_kl_loss}
LM_FIELDS = ("tokens", "targets", "positions", "segment_ids")
STORE_DIR = "reference_logps"


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


@base.register("dpo")
class DPO(base.TrainedOnData):
    def __init__(self, rt: base.Runtime):
        cfg, a = rt.cfg, rt.cfg.algorithm
        self.setup_training(rt, tfm.declare_params(cfg.model))
        self.precomputed = a.reference == "precomputed"
        frozen_shardings = None if self.precomputed else self.shardings["params"]
        self._train_step = base.make_train_step(self.loss_fn, self.normalizers, self.optimizer, self.schedule,
                                                self.shardings, rt.mesh, frozen_shardings=frozen_shardings)
        self._eval_step = jax.jit(self._eval_sums)
        replicated = NamedSharding(rt.mesh, PartitionSpec())
        self._ref_step = jax.jit(self._reference_sums, out_shardings=replicated)
        self.data = PairData(cfg, self.tokenizer, mode="lm", log=rt.log)
        self.exact_match = ExactMatchEval(rt, self.tokenizer, self.data.eval_examples(), a.eval_generate,
                                          a.max_new_tokens)
        self._reference = None  # frozen params (live mode, or until precomputed)
        self._store = None  # split -> tensorstore array [N, 2] of reference log-prob sums

    # -- math --
    def _reference_logps(self, mb, frozen):
        if self.precomputed:
            return mb["ref_chosen"], mb["ref_rejected"]
        sums, _, _ = pair_sequence_logps(frozen, mb, self.rt.cfg.model)
        sums = jax.lax.stop_gradient(sums)
        return sums[:, 0], sums[:, 1]

    def loss_fn(self, params, mb, norms, frozen):
        a = self.rt.cfg.algorithm
        sums, lp, mask = pair_sequence_logps(params, mb, self.rt.cfg.model)
        ref_c, ref_r = self._reference_logps(mb, frozen)
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

    @staticmethod
    def normalizers(batch):
        v = pair_valid(batch)
        return {"num_pairs": jnp.sum(v), "num_chosen_tokens": jnp.sum(v[..., None] * batch["chosen_loss_mask"])}

    def _eval_sums(self, params, batch, frozen):
        mb = jax.tree.map(lambda x: x[0], batch)
        _, m = self.loss_fn(params, mb, {"num_pairs": 1.0, "num_chosen_tokens": 1.0}, frozen)
        m["num_chosen_tokens"] = jnp.sum(pair_valid(mb)[:, None] * mb["chosen_loss_mask"])
        return m

    def _reference_sums(self, params, batch):
        mb = jax.tree.map(lambda x: x[0], batch)
        sums, _, _ = pair_sequence_logps(params, mb, self.rt.cfg.model)
        return sums, mb["index"], mb["valid"]

    # -- the reference --
    def reference_params(self):
        """The frozen reference: built like the policy's start (``init`` uses split(key(train.seed)))."""
        if self._reference is None:
            k_params, _ = jax.random.split(jax.random.key(self.rt.cfg.train.seed))
            self._reference = base.initial_params(self.rt, self.decls, k_params, log=lambda *_: None)
        return self._reference

    def _fingerprint(self) -> dict:
        m = self.rt.cfg.model
        return {"init_from": m.init_from, "hf_path": m.hf_path, "seed": self.rt.cfg.train.seed,
                "seq_len": self.rt.cfg.data.seq_len,
                "train": [len(self.data.train_records), records_fingerprint(self.data.train_records)],
                "eval": [len(self.data.eval_records), records_fingerprint(self.data.eval_records)]}

    def _open_store(self, create: bool):
        import tensorstore as ts

        root = (self.rt.run_dir / STORE_DIR).absolute()
        store = {}
        for split, records in (("train", self.data.train_records), ("eval", self.data.eval_records)):
            if not records:
                continue
            spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(root / split)}}
            if create:
                store[split] = ts.open(spec, create=True, delete_existing=True, dtype=ts.float32,
                                       shape=[len(records), 2], chunk_layout=ts.ChunkLayout(
                                           chunk_shape=[min(len(records), 1 << 16), 2])).result()
            else:
                store[split] = ts.open(spec, open=True).result()
        return store

    def precompute_reference(self) -> bool:
        """Fill ``RUN_DIR/reference_logps`` unless it already holds this data's values; True if computed."""
        if not self.precomputed or self._store is not None:
            return False
        root = self.rt.run_dir / STORE_DIR
        fingerprint = self._fingerprint()
        done = root / "done.json"
        if done.is_file() and json.loads(done.read_text()) == fingerprint:
            self._store, self._reference = self._open_store(create=False), None
            return False
        writer = jax.process_index() == 0
        if writer:
            root.mkdir(parents=True, exist_ok=True)
            done.unlink(missing_ok=True)
            store = self._open_store(create=True)
        self._sync("jalign_dpo_reference_open")
        if not writer:
            store = self._open_store(create=False)
        ref = self.reference_params()
        for split in store:
            for batch in self.data.ordered(split):
                sums, index, valid = jax.device_get(self._ref_step(ref, self.global_batch(batch, accum=1)))
                keep = np.asarray(valid) > 0
                if writer and keep.any():
                    store[split].oindex[np.asarray(index)[keep]].write(np.asarray(sums)[keep]).result()
        if writer:
            done.write_text(json.dumps(fingerprint))
        self._sync("jalign_dpo_reference_done")
        self.rt.log(f"reference log-probs precomputed into {root} "
                    f"({', '.join(f'{s}: {store[s].shape[0]}' for s in store)} pairs)")
        self._store, self._reference = store, None  # the reference params are no longer needed
        return True

    @staticmethod
    def _sync(name: str):
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def _with_reference(self, batch: dict, split: str) -> dict:
        """Add ``ref_chosen`` / ``ref_rejected`` [B] read from the store at the batch's example indices."""
        if not self.precomputed:
            return batch
        self.precompute_reference()
        values = self._store[split].oindex[np.asarray(batch["index"])].read().result()
        return dict(batch, ref_chosen=values[:, 0].astype(np.float32), ref_rejected=values[:, 1].astype(np.float32))

    def _frozen(self):
        return None if self.precomputed else self.reference_params()

    # -- protocol --
    def init(self, rng):
        state = super().init(rng)
        if self._reference is None and not (self.precomputed and self._store is not None):
            self._reference = jax.tree.map(jnp.copy, state["params"])  # own buffers: the policy's are donated
        return state

    def step(self, state, batch):
        return self._train_step(state, self.global_batch(self._with_reference(batch, "train")), self._frozen())

    def on_start(self, state, writer) -> dict:
        self.precompute_reference()
        return start_report(self, state, writer)

    def evaluate(self, state) -> dict:
        out = {}
        if self.data.has_eval:
            sums: dict = {}
            for i, batch in enumerate(self.data.eval_iterator()):
                if i >= self.rt.cfg.train.eval_batches:
                    break
                batch = self._with_reference(batch, "eval")
                m = self._eval_step(state["params"], self.global_batch(batch, accum=1),
                                    self._frozen())
                for k, v in jax.device_get(m).items():
                    sums[k] = sums.get(k, 0.0) + float(np.asarray(v))
            n, nt = max(sums["num_pairs"], 1.0), max(sums["num_chosen_tokens"], 1.0)
            out = {k: sums[k] / n for k in ("preference_loss", "accuracy", "policy_accuracy", "rewards_chosen_mean",
                                            "rewards_rejected_mean", "margin_mean")}
            out["sft_loss"] = sums["sft_loss"] / nt
            out["loss"] = out["preference_loss"] + self.rt.cfg.algorithm.sft_weight * out["sft_loss"]
        out.update(self.exact_match(state["params"], self.rt.cfg.model))
        return out

    def export(self, state, out_dir: str) -> None:
        from jalign.models.hf_io import save_hf

        save_hf(state["params"], self.rt.cfg.model, out_dir, tokenizer_dir=self.data.tokenizer_dir())
