"""Supervised fine-tuning: next-token NLL on response tokens, token mean over the global batch."""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from jalign.algorithms.base import SupervisedAlgorithm, policy_token_logps
from jalign.algorithms.registry import register
from jalign.data import fields, pipeline
from jalign.losses import sft_loss


@dataclass
class SFTConfig:
    name: str = "sft"


@register("sft", config=SFTConfig)
class SFT(SupervisedAlgorithm):
    def make_data(self):
        return pipeline.SFTData(self.cfg, self.tokenizer, log=self.rt.log)

    def batch_fields(self):
        return fields.SFT_FIELDS

    def loss(self, params, mb, norms, roles):
        logps = policy_token_logps(params, mb, self.cfg.model)
        loss, metrics = sft_loss(logps, mb["loss_mask"], norms["num_tokens"])
        return loss, {"loss": loss, "num_tokens": metrics["num_tokens"]}

    def normalizers(self, batch):
        return {"num_tokens": jnp.sum(batch["loss_mask"])}
