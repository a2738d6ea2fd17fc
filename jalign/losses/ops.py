"""Log-prob and masking ops shared by every loss."""
from __future__ import annotations

import functools

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


def _chunk_logits(h, w, temperature):
    return jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32) / temperature


def _picked(z, labels):
    # compare-and-sum, not a gather: vocabulary-sharded z reduces locally (see token_logps)
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
    return jnp.sum(jnp.where(vocab_ids == labels[..., None], z, 0.0), axis=-1), vocab_ids


def _chunk_stats(h, w, labels, temperature, entropy):
    z = _chunk_logits(h, w, temperature)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked, _ = _picked(z, labels)
    ent = lse - jnp.sum(jnp.exp(z - lse[..., None]) * z, axis=-1) if entropy else jnp.zeros_like(lse)
    return picked - lse, ent, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunk_logps(h, w, labels, temperature, entropy):
    lp, ent, _ = _chunk_stats(h, w, labels, temperature, entropy)
    return lp, ent


def _chunk_logps_fwd(h, w, labels, temperature, entropy):
    lp, ent, lse = _chunk_stats(h, w, labels, temperature, entropy)
    return (lp, ent), (h, w, labels, lse, ent)


def _chunk_logps_bwd(temperature, entropy, res, cts):
    """Hand-written backward of one chunk: recompute z = h w / T from the saved h and logsumexp, then

        d lp / d z_v = 1[v = y] - p_v,    d H / d z_v = -p_v (log p_v + H),   p = softmax(z),

    scaled by 1/T, and two matmuls for dh and dw. Written out (not autodiff of a rematerialised chunk) because
    XLA:CPU lowered the autodiff version to a transposed [V, tokens] softmax-gradient fusion and slower dots
    (the tiny model's head, [2048, 256] x [256, 8192], forward + backward in isolation: 600 ms that way, 250 ms
    this way). ``temperature`` is a Python number (a static argument of the VJP).
    """
    h, w, labels, lse, ent = res
    g_lp, g_ent = cts
    z = _chunk_logits(h, w, temperature)
    p = jnp.exp(z - lse[..., None])
    _, vocab_ids = _picked(z, labels)
    dz = jnp.where(vocab_ids == labels[..., None], g_lp[..., None], 0.0) - p * g_lp[..., None]
    if entropy:
        dz = dz - g_ent[..., None] * p * (z - lse[..., None] + ent[..., None])
    dz = (dz / temperature).astype(h.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dz, w, preferred_element_type=jnp.float32).astype(h.dtype)
    dw = jnp.einsum("bcd,bcv->dv", h, dz, preferred_element_type=jnp.float32).astype(w.dtype)
    return dh, dw, None


_chunk_logps.defvjp(_chunk_logps_fwd, _chunk_logps_bwd)


def chunked_token_logps(hidden: jax.Array, unembed: jax.Array, labels: jax.Array, chunk_size: int = 512,
                        temperature: float = 1.0, return_entropy: bool = False):
    """``token_logps(hidden @ unembed, labels)`` computed ``chunk_size`` positions at a time.

    hidden [B, T, D], unembed [D, V], labels [B, T]. Only [B, chunk, V] logits exist at once, in the
    forward pass and in the backward pass (which recomputes each chunk's logits from its hidden states and
    saved logsumexp: a fused linear + log-softmax, see ``_chunk_logps_bwd``). With ``return_entropy`` also
    returns the per-token entropy of softmax(logits / T), differentiable too.
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
    w = unembed.astype(hidden.dtype)
    temperature = float(temperature)
    if n == 1:  # one chunk: no loop (a length-1 map still costs a loop's copies on XLA:CPU)
        lps, ents = _chunk_logps(hs[0], w, ls[0], temperature, return_entropy)
        lps, ents = lps[None], ents[None]
    else:
        lps, ents = jax.lax.map(lambda a: _chunk_logps(a[0], w, a[1], temperature, return_entropy), (hs, ls))
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
