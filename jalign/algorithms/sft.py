"""Supervised fine-tuning: next-token NLL on response tokens, token mean over the global batch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms import base
from jalign.algorithms.evaluation import ExactMatchEval
from jalign.data import pipeline
from jalign.algorithms.base import policy_token_logps
from jalign.losses import sft_loss
from jalign.models import transformer as tfm

@base.register("sft")
class SFT(base.TrainedOnData):
    def __init__(self, rt: base.Runtime):
        cfg = rt.cfg
        self.setup_training(rt, tfm.declare_params(cfg.model))
        self._train_step = base.make_train_step(self.loss_fn, self.normalizers, self.optimizer, self.schedule,
                                                self.shardings, rt.mesh)
        self._eval_step = jax.jit(self._eval_sums)
        self.data = pipeline.SFTData(cfg, self.tokenizer, log=rt.log)
        self.exact_match = ExactMatchEval(rt, self.tokenizer, self.data.eval_examples(),
                                          cfg.algorithm.eval_generate, cfg.algorithm.max_new_tokens)

    # -- math --
    def loss_fn(self, params, mb, norms, frozen):
        logps = policy_token_logps(params, mb, self.rt.cfg.model)
        loss, metrics = sft_loss(logps, mb["loss_mask"], norms["num_tokens"])
        return loss, {"loss": loss, "num_tokens": metrics["num_tokens"]}

    @staticmethod
    def normalizers(batch):
        return {"num_tokens": jnp.sum(batch["loss_mask"])}

    def _eval_sums(self, params, batch):
        batch = jax.tree.map(lambda x: x[0], batch)  # drop the accumulation axis
        logps = policy_token_logps(params, batch, self.rt.cfg.model)
        m = batch["loss_mask"]
        return {"nll_sum": -jnp.sum(jnp.where(m > 0, logps, 0.0)), "num_tokens": jnp.sum(m)}

    # -- protocol (init, abstract_state, batches: base.TrainedOnData) --
    def step(self, state, batch):
        return self._train_step(state, self.global_batch(batch), None)

    def evaluate(self, state) -> dict:
        out = {}
        if self.data.has_eval:
            nll, count = 0.0, 0.0
            for i, batch in enumerate(self.data.eval_iterator()):
                if i >= self.rt.cfg.train.eval_batches:
                    break
                sums = self._eval_step(state["params"], self.global_batch(batch, accum=1))
                nll += float(np.asarray(jax.device_get(sums["nll_sum"])))
                count += float(np.asarray(jax.device_get(sums["num_tokens"])))
            out["loss"] = nll / max(count, 1.0)
        out.update(self.exact_match(state["params"], self.rt.cfg.model))
        return out

    def export(self, state, out_dir: str) -> None:
        from jalign.models.hf_io import save_hf

        save_hf(state["params"], self.rt.cfg.model, out_dir, tokenizer_dir=self.data.tokenizer_dir())
