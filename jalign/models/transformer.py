"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) as pure functions.

    hidden = forward(params, tokens, positions, segment_ids, cfg)          # [B, T, D], final-normed
    logits = lm_logits(params, hidden, cfg)                                 # [B, T, V], vocab-sharded
    scores = score_head(params, hidden)                                     # [B, T, A] (reward / value)

Layers are stacked on a leading "layers" axis and run with ``lax.scan``. ``segment_ids`` (0 = padding)
keep packed examples from attending to each other. A KV cache (see ``init_cache``) turns the same
function into the prefill / decode step used by ``jalign.generate``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from jalign.config import ModelConfig
from jalign.models.attention import attend
from jalign.models.lora import linear
from jalign.models.params import DTYPES, ParamDecl
from sharding.rules import constrain


# ---- declaration --------------------------------------------------------------------------------
def declare_params(cfg: ModelConfig, *, lm_head: bool = True, score_outputs: int = 0) -> dict:
    """The one declaration of every parameter: shape, logical axes and initializer.

    ``lm_head``: keep the language-model head (policy / reference). ``score_outputs``: add a linear
    head with that many outputs on the final hidden state (reward model attributes, critic value).
    """
    D, F, L, V = cfg.hidden, cfg.mlp, cfg.layers, cfg.vocab_size
    H, KV, hd = cfg.heads, cfg.kv_heads, cfg.resolved_head_dim
    std = cfg.init_std
    out_std = std / math.sqrt(2 * L)  # GPT-2 style scaled init of residual projections
    layers = {
        "attn_norm": ParamDecl((L, D), ("layers", "norm"), "ones"),
        "q": ParamDecl((L, D, H, hd), ("layers", "embed", "heads", "head_dim"), std=std),
        "k": ParamDecl((L, D, KV, hd), ("layers", "embed", "kv_heads", "head_dim"), std=std),
        "v": ParamDecl((L, D, KV, hd), ("layers", "embed", "kv_heads", "head_dim"), std=std),
        "o": ParamDecl((L, H, hd, D), ("layers", "heads", "head_dim", "embed"), std=out_std),
        "mlp_norm": ParamDecl((L, D), ("layers", "norm"), "ones"),
        "gate": ParamDecl((L, D, F), ("layers", "embed", "mlp"), std=std),
        "up": ParamDecl((L, D, F), ("layers", "embed", "mlp"), std=std),
        "down": ParamDecl((L, F, D), ("layers", "mlp", "embed"), std=out_std),
    }
    if cfg.qkv_bias:
        layers["q_bias"] = ParamDecl((L, H, hd), ("layers", "heads", "head_dim"), "zeros")
        layers["k_bias"] = ParamDecl((L, KV, hd), ("layers", "kv_heads", "head_dim"), "zeros")
        layers["v_bias"] = ParamDecl((L, KV, hd), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        layers["q_norm"] = ParamDecl((L, hd), ("layers", "head_dim"), "ones")
        layers["k_norm"] = ParamDecl((L, hd), ("layers", "head_dim"), "ones")
    decls = {
        "embed": ParamDecl((V, D), ("vocab", "embed"), std=std),
        "layers": layers,
        "final_norm": ParamDecl((D,), ("norm",), "ones"),
    }
    if lm_head and not cfg.tie_embeddings:
        decls["lm_head"] = ParamDecl((D, V), ("embed", "vocab"), std=std)
    if score_outputs:
        decls["score"] = ParamDecl((D, score_outputs), ("embed", "attributes"), std=1.0 / math.sqrt(D + 1))
        decls["score_bias"] = ParamDecl((score_outputs,), ("attributes",), "zeros")
    return decls


# ---- building blocks ----------------------------------------------------------------------------
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """y = x / sqrt(mean(x^2) + eps) * w, statistics in float32."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y.astype(x.dtype) * weight.astype(x.dtype)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies theta^(-2i/d), with Llama-3 (or linear) scaling when configured."""
    hd = cfg.resolved_head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.type == "linear":
        return inv / s.factor
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    interp = (1 - smooth) * inv / s.factor + smooth * inv
    return jnp.where(wavelen > low_wavelen, inv / s.factor, jnp.where(wavelen < high_wavelen, inv, interp))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE (Hugging Face layout). x: [B, T, N, hd], positions: [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def _remat_policy(name: str):
    return {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


# ---- the layer ----------------------------------------------------------------------------------
def _layer(cfg: ModelConfig, x, p, positions, q_seg, kv_seg, q_idx, kv_idx, inv_freq, cache_kv, cache_index,
           window=None, paged=None):
    dtype = DTYPES[cfg.dtype]
    w = lambda name: p[name].astype(dtype)  # noqa: E731
    mm = lambda eq, a, name: linear(eq, a, p[name], dtype)  # noqa: E731  plain, quantised or LoRA weight
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q = mm("btd,dhk->bthk", h, "q")
    k = mm("btd,dhk->bthk", h, "k")
    v = mm("btd,dhk->bthk", h, "v")
    if cfg.qkv_bias:
        q, k, v = q + w("q_bias"), k + w("k_bias"), v + w("v_bias")
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    q = constrain(apply_rope(q, positions, inv_freq), ("batch", "seq", "heads", "head_dim"))
    k = constrain(apply_rope(k, positions, inv_freq), ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    new_cache = None
    if paged is not None:  # paged KV cache: cache_kv = all pages, cache_index = this layer; k/v -> row contexts
        k, v, new_cache = paged.update(k, v, cache_kv, cache_index)
    elif cache_kv is not None:
        ck, cv = cache_kv
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
        new_cache = (ck, cv)
        k, v = ck.astype(dtype), cv.astype(dtype)
    attn = attend(q, k, v, q_seg, kv_seg, q_idx, kv_idx, impl=cfg.attention, window=window)
    x = x + constrain(mm("bthk,hkd->btd", attn, "o"), ("batch", "seq", "act_embed"))
    h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    gate = constrain(mm("btd,df->btf", h, "gate"), ("batch", "seq", "mlp"))
    up = constrain(mm("btd,df->btf", h, "up"), ("batch", "seq", "mlp"))
    x = x + constrain(mm("btf,fd->btd", jax.nn.silu(gate) * up, "down"), ("batch", "seq", "act_embed"))
    return x, new_cache


def sequence_parallel_size() -> int:
    """Devices on the mesh axis the ``seq`` logical axis maps to, in the active ``use_rules`` context (1
    outside one): where activations are split along the sequence and attention runs as a ring."""
    from sharding.ring_attention import ring_size
    from sharding.rules import active_rules

    mesh, rules = active_rules()
    return ring_size(mesh, rules)


_NO_WINDOW = 2**30  # a window no row reaches: full attention in that layer


def layer_windows(cfg: ModelConfig, num_keys: int) -> Optional[jax.Array]:
    """int32 [layers] sliding window per layer (``_NO_WINDOW`` for full-attention layers), or None when
    no layer's window is shorter than ``num_keys`` (then the mask is the plain causal one)."""
    w, start = cfg.sliding_window, cfg.sliding_window_start_layer
    if w is None or start >= cfg.layers or w >= num_keys:
        return None
    if w < 1 or start < 0:
        raise ValueError(f"model.sliding_window={w} must be >= 1 and model.sliding_window_start_layer={start} >= 0")
    return jnp.asarray([_NO_WINDOW] * start + [w] * (cfg.layers - start), jnp.int32)


def embed_tokens(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """Row lookup in the [V, D] table. The table's d_model (fsdp) shards are gathered first so the
    lookup partitions over the vocabulary alone: each tensor shard gathers the rows it owns and one
    all-reduce combines them, instead of SPMD replicating the whole table."""
    table = constrain(table, ("vocab", None))
    x = jnp.take(table, tokens, axis=0, mode="clip").astype(dtype)
    return constrain(x, ("batch", "seq", "act_embed"))


def forward(params: dict, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, cfg: ModelConfig,
            *, cache: Optional[dict] = None, cache_index=None, token_index: Optional[jax.Array] = None,
            paged=None):
    """Final-normed hidden states [B, T, D].

    tokens, positions, segment_ids: [B, T] int32; segment_ids 0 marks padding, equal ids attend to
    each other causally (by index within the row). With ``cache`` (from ``init_cache``), the new k/v
    are written at slot ``cache_index`` and attention covers every valid cache slot up to the query;
    returns ``(hidden, new_cache)`` in that case. ``token_index`` [B, T]: each token's position in the
    original row order (default ``arange(T)``); pass it when the row was permuted (zigzag layout for
    ring attention), since causal masking compares these indices.

    Rows longer than ``cfg.max_seq_len`` raise (with a cache the slots may exceed it: callers bucket
    them, and ``generate`` checks the real lengths). ``cfg.sliding_window`` adds ``t - s < window`` on
    the same indices in the layers it covers (see :func:`layer_windows`).
    ``paged`` (instead of ``cache``): a paged KV cache view (``jalign.rollout.paged.PagedView``); its
    ``pages`` ride in the layer loop's carry (updated in place), each layer writes its k/v through
    ``paged.update`` and attends over each row's context in sequence order (``positions`` are the
    tokens' sequence positions). Returns ``(hidden, new_pages)``.
    """
    B, T = tokens.shape
    if cache is None and T > cfg.max_seq_len:
        raise ValueError(f"rows of {T} tokens are longer than model.max_seq_len={cfg.max_seq_len} (the positions "
                         "the model supports); shorten data.seq_len / the rollout, or raise model.max_seq_len")
    n = sequence_parallel_size()
    windows = layer_windows(cfg, T if cache is None else cache["segment_ids"].shape[1])
    if windows is not None and n > 1 and cache is None:
        raise ValueError(f"model.sliding_window={cfg.sliding_window} is shorter than the rows ({T} tokens), and "
                         f"ring attention (mesh.sequence={n} > 1) does not support a sliding window; use "
                         "mesh.sequence=1")
    if n > 1 and cfg.attention != "ring":
        # Activations sharded along the sequence need the ring: every caller gets it from the mesh alone.
        cfg = dataclasses.replace(cfg, attention="ring")
    if n > 1 and cache is None and paged is None and token_index is None:
        # Zigzag layout for causal load balance: permute the row once, let attention mask by the
        # original indices, and restore row order of the output so every caller stays unchanged.
        from sharding.ring_attention import zigzag_inverse, zigzag_permutation

        perm, inv = zigzag_permutation(T, n), zigzag_inverse(T, n)
        order = jnp.broadcast_to(jnp.asarray(perm, jnp.int32), (B, T))
        hidden = forward(params, tokens[:, perm], positions[:, perm], segment_ids[:, perm], cfg, token_index=order)
        return constrain(hidden[:, inv], ("batch", "seq", "act_embed"))
    dtype = DTYPES[cfg.dtype]
    x = embed_tokens(params["embed"], tokens, dtype)
    inv_freq = rope_inv_freq(cfg)
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if token_index is not None:
        if cache is not None:
            raise ValueError("token_index (permuted rows) is not supported with a KV cache")
        idx = jnp.asarray(token_index, jnp.int32)
    q_seg, q_idx = segment_ids, idx
    if paged is not None:
        return _forward_paged(params, x, positions, segment_ids, cfg, paged, inv_freq)
    if cache is None:
        kv_seg, kv_idx = segment_ids, idx
    else:
        q_idx = idx + cache_index
        kv_seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, cache_index, axis=1)
        S = kv_seg.shape[1]
        kv_idx = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))

    def body(carry, xs):
        window = None
        if windows is not None:
            xs, window = xs
        if cache is None:
            p, ckv = xs, None
        else:
            p, ck, cv = xs
            ckv = (ck, cv)
        y, new_kv = _layer(cfg, carry, p, positions, q_seg, kv_seg, q_idx, kv_idx, inv_freq, ckv, cache_index,
                           window)
        return y, new_kv

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_remat_policy(cfg.remat), prevent_cse=False)
    xs = params["layers"] if cache is None else (params["layers"], cache["k"], cache["v"])
    if windows is not None:
        xs = (xs, windows)
    x, new_kv = jax.lax.scan(body, x, xs)
    hidden = rms_norm(x, params["final_norm"], cfg.norm_eps)
    if cache is None:
        return hidden
    return hidden, {"k": new_kv[0], "v": new_kv[1], "segment_ids": kv_seg}


def _forward_paged(params, x, positions, segment_ids, cfg, paged, inv_freq):
    """The layer loop over a paged cache: the pages are carried (so each layer's scatter is in place,
    never a copy of the pool) and each layer gets its index to address them. ``params["layers"]`` may
    also be a list of per-layer trees (the engine slices them once per call on CPU, where XLA otherwise
    copies every layer's weights out of the stack at every step); the layers then run unrolled."""
    kv_seg, kv_idx = paged.context_index(x.shape[0])
    windows = layer_windows(cfg, kv_idx.shape[1])  # a sliding window masks the paged context like the dense one
    if isinstance(params["layers"], (list, tuple)):
        pages = paged.pages
        for i, p in enumerate(params["layers"]):
            x, pages = _layer(cfg, x, p, positions, segment_ids, kv_seg, positions, kv_idx, inv_freq, pages, i,
                              window=None if windows is None else windows[i], paged=paged)
        return rms_norm(x, params["final_norm"], cfg.norm_eps), pages

    def body(carry, xs):
        y, pages = carry
        p, layer = xs
        window = None if windows is None else windows[layer]
        return _layer(cfg, y, p, positions, segment_ids, kv_seg, positions, kv_idx, inv_freq, pages, layer,
                      window=window, paged=paged), None

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_remat_policy(cfg.remat), prevent_cse=False)
    layers = jnp.arange(cfg.layers, dtype=jnp.int32)
    (x, pages), _ = jax.lax.scan(body, (x, paged.pages), (params["layers"], layers))
    return rms_norm(x, params["final_norm"], cfg.norm_eps), pages


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """Empty KV cache: k/v [L, B, S, KV, hd] and per-slot segment ids (0 = empty)."""
    dtype = dtype or DTYPES[cfg.dtype]
    shape = (cfg.layers, batch, length, cfg.kv_heads, cfg.resolved_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, length), jnp.int32)}


CACHE_AXES = {"k": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
              "v": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
              "segment_ids": ("batch", "cache_seq")}


def unembed_matrix(params: dict, cfg: ModelConfig) -> jax.Array:
    """[D, V] output projection (the transposed embedding when tied)."""
    if "lm_head" in params:
        return params["lm_head"]
    return params["embed"].T


def lm_logits(params: dict, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """[B, T, V] logits in float32, left sharded over the vocabulary."""
    w = unembed_matrix(params, cfg).astype(DTYPES[cfg.dtype])
    logits = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab"))


def score_head(params: dict, hidden: jax.Array) -> jax.Array:
    """[B, T, A] float32 scores (reward attributes or critic values) at every position."""
    return jnp.einsum("btd,da->bta", hidden.astype(jnp.float32), params["score"].astype(jnp.float32)) + params[
        "score_bias"
    ].astype(jnp.float32)
