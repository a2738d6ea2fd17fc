"""An algorithm defined outside the jalign package, selected by import path (``ext_algorithm:ChosenNLL``).

It is the whole of what a new supervised algorithm is: its config dataclass, its loss wiring and its data
kind (preference pairs; it trains on the chosen side only, like SFT on the winners).
"""
from dataclasses import dataclass

import jax.numpy as jnp

from jalign.algorithms.base import SupervisedAlgorithm, policy_token_logps
from jalign.algorithms.registry import register
from jalign.data.preference import PairData
from jalign.losses import sft_loss


@dataclass
class ChosenNLLConfig:
    name: str = "ext_algorithm:ChosenNLL"
    weight: float = 1.0


@register("ext_chosen_nll", config=ChosenNLLConfig)
class ChosenNLL(SupervisedAlgorithm):
    def make_data(self):
        return PairData(self.cfg, self.tokenizer, mode="lm", log=self.rt.log)

    def loss(self, params, mb, norms, roles):
        chosen = {k: mb[k][:, 0] for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
        logps = policy_token_logps(params, chosen, self.cfg.model)
        loss, m = sft_loss(logps, chosen["loss_mask"] * mb["valid"][:, None], norms["num_tokens"])
        return self.a.weight * loss, {"loss": self.a.weight * loss, "num_tokens": m["num_tokens"]}

    def normalizers(self, batch):
        return {"num_tokens": jnp.sum(batch["loss_mask"][..., 0, :] * batch["valid"][..., None])}
