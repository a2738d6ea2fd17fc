"""Pure loss functions and ops for alignment. Imports only jax and numpy.

Every loss takes arrays (log-probs, rewards, values, masks) and returns ``(loss, metrics)``.
Divisors are explicit: pass the *global* count (valid tokens or valid sequences in the whole
optimizer batch) so the result does not depend on how the batch is split into micro-batches.
"""
from jalign.losses.ops import (
    chunked_token_logps,
    masked_mean,
    masked_sum,
    safe_divide,
    sequence_logps,
    token_logps,
)
from jalign.losses.sft import sft_loss

__all__ = [
    "chunked_token_logps", "masked_mean", "masked_sum", "safe_divide", "sequence_logps", "token_logps",
    "sft_loss",
]
