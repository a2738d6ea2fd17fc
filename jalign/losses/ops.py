"""Log-prob and masking ops shared by every loss."""
from __future__ import annotations


import jax
import jax.numpy as jnp


def safe_divide(num, den):
    """num / den, and 0 where den == 0 (an all-masked batch contributes nothing instead of NaN)."""
    den = jnp.asarray(den, jnp.float32)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def masked_sum(x, mask, axis=None):
    return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask, axis=axis)


def masked_mean(x, mask, axis=None, count=None):
    """sum(x * mask) / count, with count = sum(mask) unless a global count is given."""
    if count is None:
        count = jnp.sum(mask, axis=axis)
    return safe_divide(masked_sum(x, mask, axis=axis), count)


def token_logps(logits: jax.Array, labels: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / T)[label] per position: [..., V], [...] -> [...] float32.

    log p(y) = z_y / T - logsumexp(z / T). The label's logit is picked with a compare-and-sum over
    the vocabulary rather than a gather, so vocabulary-sharded logits reduce locally and only
    [...]-shaped partial results cross devices; the vocabulary is never gathered.
    """
    z = logits.astype(jnp.float32) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
    picked = jnp.sum(jnp.where(vocab_ids == labels[..., None], z, 0.0), axis=-1)
    return picked - lse


def chunked_token_logps(hidden: jax.Array, unembed: jax.Array, labels: jax.Array, chunk_size: int = 512,
                        temperature: float = 1.0, return_entropy: bool = False):
    """``token_logps(hidden @ unembed, labels)`` computed ``chunk_size`` positions at a time.

    hidden [B, T, D], unembed [D, V], labels [B, T]. Only [B, chunk, V] logits exist at once, in the
    forward pass and (through rematerialisation) in the backward pass. With ``return_entropy`` also
    returns the per-token entropy of softmax(logits / T).
    """
    B, T, D = hidden.shape
    c = min(chunk_size, T)
    pad = (-T) % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
    n = (T + pad) // c
    hs = hidden.reshape(B, n, c, D).swapaxes(0, 1)
    ls = labels.reshape(B, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(h, lab):
        z = jnp.einsum("bcd,dv->bcv", h, unembed.astype(h.dtype), preferred_element_type=jnp.float32)
        lp = token_logps(z, lab, temperature)
        if not return_entropy:
            return lp, jnp.zeros_like(lp)
        logp_all = jax.nn.log_softmax(z / temperature, axis=-1)
        return lp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)

    lps, ents = jax.lax.map(lambda a: one(*a), (hs, ls))
    lps = lps.swapaxes(0, 1).reshape(B, n * c)[:, :T]
    if return_entropy:
        return lps, ents.swapaxes(0, 1).reshape(B, n * c)[:, :T]
    return lps


def sequence_logps(token_logps_: jax.Array, mask: jax.Array, average: bool = False) -> jax.Array:
    """Per-sequence sum (or mean, ``average=True``) of token log-probs under a [B, T] mask.

    A sequence with no valid token gets 0 (not NaN) for both.
    """
    total = jnp.sum(jnp.where(mask > 0, token_logps_, 0.0), axis=-1)
    if average:
        return safe_divide(total, jnp.sum(mask, axis=-1))
    return total


def _valid_and_count(valid, shape, count=None):
    """(float32 validity mask of ``shape``, divisor): the divisor is ``count`` if given (the *global*
    number of valid items in the optimizer batch) else sum(valid) of this batch."""
    v = jnp.ones(shape, jnp.float32) if valid is None else jnp.broadcast_to(jnp.asarray(valid, jnp.float32), shape)
    n = jnp.sum(v) if count is None else jnp.asarray(count, jnp.float32)
    return v, n


def _wsum(x, w):
    """sum(x * w) with x zeroed where w == 0 (so NaN/inf in padded entries cannot leak)."""
    return jnp.sum(jnp.where(w > 0, x, 0.0) * w)
