"""Supervised fine-tuning loss."""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from jalign.losses.ops import safe_divide


def sft_loss(token_logps, loss_mask, num_tokens: Optional[float] = None):
    """Token-level negative log-likelihood on response tokens.

        L = - sum_{b,t} m_{b,t} log p(y_{b,t} | y_{<t}) / N

    with N = ``num_tokens``, the number of valid (m = 1) tokens in the *global* optimizer batch, so that
    summing L over micro-batches equals the big-batch mean. Defaults to sum(m) of this batch.
    Returns ``(loss, {"loss", "num_tokens"})``.
    """
    m = loss_mask.astype(jnp.float32)
    n = jnp.sum(m) if num_tokens is None else num_tokens
    loss = -safe_divide(jnp.sum(jnp.where(m > 0, token_logps, 0.0) * m), n)
    return loss, {"loss": loss, "num_tokens": jnp.sum(m)}
