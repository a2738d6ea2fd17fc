"""Distillation losses and ops against NumPy: student log-probs at ids, teacher top-k, top-k KD (== full KL
when k = V), GKD's generalised JSD, on-policy reverse KL; chunked == unchunked; vocabulary-sharded ==
unsharded without gathering the vocabulary."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jalign.losses as L
from sharding.mesh import make_mesh
from sharding.rules import DEFAULT_RULES, named_sharding, use_rules

from test_losses import close, finite_tree


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def np_log_softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis, keepdims=True))


def _model(rng, B=2, T=7, D=8, V=32, scale=1.5):
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    W = (rng.normal(size=(D, V)) * scale / np.sqrt(D)).astype(np.float32)
    return h, W


def _mask(rng, B, T):
    m = (rng.random((B, T)) > 0.3).astype(np.float32)
    m[0, 0] = 1.0
    return m


# ============================================================================ ops
@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_logps_at_and_teacher_topk(rng, chunk):
    h, W = _model(rng)
    B, T, _ = h.shape
    V, K, tau = W.shape[1], 5, 1.7
    ids = rng.integers(0, V, size=(B, T, K)).astype(np.int32)
    ref = np.take_along_axis(np_log_softmax(h @ W / tau), ids, -1)
    close(L.chunked_logps_at(h, W, ids, chunk_size=chunk, temperature=tau), ref, rtol=1e-5, atol=1e-5)
    # gradients equal those of the plain (unchunked) computation
    wts = rng.normal(size=ids.shape).astype(np.float32)
    plain = lambda h, W: jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(h @ W / tau), ids, -1) * wts)
    chunked = lambda h, W: jnp.sum(L.chunked_logps_at(h, W, ids, chunk_size=chunk, temperature=tau) * wts)
    for a, b in zip(jax.grad(chunked, argnums=(0, 1))(h, W), jax.grad(plain, argnums=(0, 1))(h, W)):
        close(a, b, rtol=1e-4, atol=1e-5)
    t_ids, t_lp = L.teacher_topk(h, W, K, temperature=tau, chunk_size=chunk)
    full = np_log_softmax(h @ W / tau)
    order = np.argsort(-full, axis=-1, kind="stable")[..., :K]
    assert np.array_equal(np.asarray(t_ids), order)
    close(t_lp, np.take_along_axis(full, order, -1), rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(np.asarray(t_lp), axis=-1) <= 0)
    # ties go to the smaller id, as lax.top_k; k outside [1, V] is an error
    tie_ids, _ = L.teacher_topk(np.zeros((1, 2, 2), np.float32), np.zeros((2, 6), np.float32), 3)
    assert np.asarray(tie_ids).tolist() == [[[0, 1, 2], [0, 1, 2]]]
    with pytest.raises(ValueError, match="k must be"):
        L.teacher_topk(h, W, V + 1)


# ============================================================================ top-k KD
def _np_topk_kl(s_lp, t_lp, mask, tau, reverse=False):
    p = np.exp(np_log_softmax(np.asarray(t_lp, np.float64) / tau))
    q = np.exp(np_log_softmax(np.asarray(s_lp, np.float64) / tau))
    tot = 0.0
    for b, t in zip(*np.nonzero(mask)):
        pp, qq = p[b, t], q[b, t]
        tot += (qq * np.log(qq / pp)).sum() if reverse else (pp * np.log(pp / qq)).sum()
    return tot / mask.sum()


@pytest.mark.parametrize("reverse", [False, True])
def test_kd_topk_vs_numpy(rng, reverse):
    hs, Ws = _model(rng)
    ht, Wt = _model(rng, D=12, scale=3.0)  # a teacher of another width, same vocabulary
    B, T, _ = hs.shape
    mask = _mask(rng, B, T)
    K, tau = 6, 2.0
    t_ids, t_lp = L.teacher_topk(ht, Wt, K)
    s_lp = L.chunked_logps_at(hs, Ws, t_ids, chunk_size=3)
    fn = L.kd_topk_bwd_loss if reverse else L.kd_topk_loss
    loss, m = fn(s_lp, t_lp, mask, temperature=tau)
    close(loss, _np_topk_kl(np.asarray(s_lp), np.asarray(t_lp), mask, tau, reverse), rtol=1e-4)
    close(m["teacher_topk_mass"], np.exp(np.asarray(t_lp, np.float64)).sum(-1)[mask > 0].sum() / mask.sum(),
          rtol=1e-5)
    assert float(m["num_tokens"]) == mask.sum()
    # micro-batch invariance with a global count; all masked; garbage under the mask; finite gradients
    parts = [fn(s_lp[i:i + 1], t_lp[i:i + 1], mask[i:i + 1], mask.sum(), temperature=tau) for i in range(B)]
    close(sum(p[0] for p in parts), loss)
    assert float(fn(s_lp, t_lp, np.zeros_like(mask))[0]) == 0.0
    bad = np.asarray(s_lp).copy()
    bad[mask == 0] = -np.inf
    close(fn(bad, t_lp, mask, temperature=tau)[0], loss)
    g = jax.grad(lambda h, W: fn(L.chunked_logps_at(h, W, t_ids, chunk_size=3), t_lp, mask)[0],
                 argnums=(0, 1))(hs, Ws)
    assert finite_tree(g)
    big = np.asarray(s_lp) * 1e4
    assert finite_tree(jax.grad(lambda x: fn(x, t_lp * 1e4, mask)[0])(big))


def test_kd_topk_equals_full_kl_when_k_is_vocab(rng):
    hs, Ws = _model(rng)
    ht, Wt = _model(rng, scale=3.0)
    B, T, _ = hs.shape
    V = Ws.shape[1]
    mask = _mask(rng, B, T)
    tau = 1.5
    t_ids, t_lp = L.teacher_topk(ht, Wt, V)  # k = V: all ids, in the teacher's order
    s_lp = L.chunked_logps_at(hs, Ws, t_ids)
    p = np.exp(np_log_softmax(ht @ Wt / tau))
    q = np.exp(np_log_softmax(hs @ Ws / tau))
    full = (p * np.log(p / q)).sum(-1)
    close(L.kd_topk_loss(s_lp, t_lp, mask, temperature=tau)[0], full[mask > 0].sum() / mask.sum(), rtol=1e-4)
    # ... and equals GKD's beta = 0 (forward KL over the full vocabulary)
    close(L.generalized_jsd_loss(hs, Ws, ht, Wt, mask, beta=0.0, temperature=tau)[0],
          full[mask > 0].sum() / mask.sum(), rtol=1e-4)
    close(L.kd_topk_bwd_loss(s_lp, t_lp, mask, temperature=tau)[0],
          (q * np.log(q / p)).sum(-1)[mask > 0].sum() / mask.sum(), rtol=1e-4)


# ============================================================================ GKD
def _np_jsd(zs, zt, beta, tau):
    s = np.exp(np_log_softmax(zs / tau))
    t = np.exp(np_log_softmax(zt / tau))
    if beta == 0.0:
        return (t * np.log(t / s)).sum(-1)
    if beta == 1.0:
        return (s * np.log(s / t)).sum(-1)
    mix = beta * t + (1 - beta) * s
    return beta * (t * np.log(t / mix)).sum(-1) + (1 - beta) * (s * np.log(s / mix)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_vs_numpy(rng, beta):
    hs, Ws = _model(rng)
    ht, Wt = _model(rng, D=12, scale=3.0)
    mask = _mask(rng, *hs.shape[:2])
    tau = 0.8
    per = _np_jsd(hs @ Ws, ht @ Wt, beta, tau)
    close(L.token_generalized_jsd(hs @ Ws, ht @ Wt, beta=beta, temperature=tau), per, rtol=1e-4, atol=1e-6)
    for chunk in (2, 7):
        loss, m = L.generalized_jsd_loss(hs, Ws, ht, Wt, mask, beta=beta, temperature=tau, chunk_size=chunk)
        close(loss, per[mask > 0].sum() / mask.sum(), rtol=1e-4)
    plain = lambda h, W: jnp.sum(jnp.where(mask > 0, L.token_generalized_jsd(h @ W, ht @ Wt, beta=beta,
                                                                            temperature=tau), 0.0)) / mask.sum()
    chunked = lambda h, W: L.generalized_jsd_loss(h, W, ht, Wt, mask, beta=beta, temperature=tau, chunk_size=3)[0]
    for a, b in zip(jax.grad(chunked, argnums=(0, 1))(hs, Ws), jax.grad(plain, argnums=(0, 1))(hs, Ws)):
        close(a, b, rtol=1e-4, atol=1e-6)
    # the teacher gets no gradient; identical distributions give 0; all masked gives 0
    gt = jax.grad(lambda W: L.generalized_jsd_loss(hs, Ws, ht, W, mask, beta=beta)[0])(Wt)
    assert np.all(np.asarray(gt) == 0)
    close(L.generalized_jsd_loss(hs, Ws, hs, Ws, mask, beta=beta)[0], 0.0, atol=1e-6)
    assert float(L.generalized_jsd_loss(hs, Ws, ht, Wt, np.zeros_like(mask), beta=beta)[0]) == 0.0
    big = L.token_generalized_jsd(1e4 * (hs @ Ws), -1e4 * (ht @ Wt), beta=beta)
    assert finite_tree(big)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_padded_vocabulary_with_minus_inf_logits(rng, beta):
    """Ids masked with -inf logits on both sides (vocabulary padding) contribute nothing and no NaN."""
    hs, Ws = _model(rng, V=36)
    ht, Wt = _model(rng, V=36, scale=3.0)
    mask = _mask(rng, *hs.shape[:2])
    pad = np.zeros(36, np.float32)
    pad[32:] = -np.inf
    zs, zt = hs @ Ws + pad, ht @ Wt + pad
    per = _np_jsd((hs @ Ws)[..., :32], (ht @ Wt)[..., :32], beta, 1.0)
    f = lambda z: jnp.sum(jnp.where(mask > 0, L.token_generalized_jsd(z, zt, beta=beta), 0.0))
    close(f(zs), per[mask > 0].sum(), rtol=1e-4)
    g = jax.grad(f)(zs)
    assert finite_tree(g) and np.all(np.asarray(g)[..., 32:] == 0)
    # top-k KD over all ids including the padding == the real-vocabulary KL
    s_lp = jax.nn.log_softmax(zs, -1)
    t_lp = jax.nn.log_softmax(zt, -1)
    kd = lambda s: L.kd_topk_loss(s, t_lp, mask)[0]
    close(kd(s_lp), _np_jsd((hs @ Ws)[..., :32], (ht @ Wt)[..., :32], 0.0, 1.0)[mask > 0].mean(), rtol=1e-4)
    assert finite_tree(jax.grad(kd)(s_lp))


def test_reverse_kl_distill_loss(rng):
    B, T = 4, 6
    s = -rng.random((B, T)).astype(np.float32) * 3
    t = -rng.random((B, T)).astype(np.float32) * 3
    mask = _mask(rng, B, T)
    loss, m = L.reverse_kl_distill_loss(s, t, mask)
    n = mask.sum()
    close(m["reverse_kl"], (s - t)[mask > 0].sum() / n, rtol=1e-5)
    close(loss, ((s - t) * s)[mask > 0].sum() / n, rtol=1e-5)
    # the gradient is the score-function estimate: (log pi_S - log pi_T) / N on each valid token
    g = jax.grad(lambda x: L.reverse_kl_distill_loss(x, t, mask)[0])(s)
    close(g, np.where(mask > 0, (s - t) / n, 0.0))
    bad = s.copy()
    bad[mask == 0] = np.nan
    close(L.reverse_kl_distill_loss(bad, t, mask)[0], loss)
    assert float(L.reverse_kl_distill_loss(s, t, np.zeros_like(mask))[0]) == 0.0


# ============================================================================ sharded == unsharded
@pytest.mark.parametrize("shape", [(1, 8), (2, 4)])
def test_vocab_sharded_distillation_equals_unsharded(rng, shape):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    data, tensor = shape
    mesh = make_mesh(data=data, tensor=tensor)
    hs, Ws = _model(rng, B=4, T=6, D=8, V=64)
    ht, Wt = _model(rng, B=4, T=6, D=16, V=64, scale=3.0)
    mask = _mask(rng, 4, 6)
    K = 5
    t_ids, t_lp = L.teacher_topk(ht, Wt, K, chunk_size=4)

    def kd(hs, Ws, ids, tlp, mask):
        return L.kd_topk_loss(L.chunked_logps_at(hs, Ws, ids, chunk_size=4), tlp, mask, temperature=2.0)[0]

    def jsd(hs, Ws, ht, Wt, mask):
        return L.generalized_jsd_loss(hs, Ws, ht, Wt, mask, beta=0.5, chunk_size=4)[0]

    ref_kd, ref_kd_g = kd(hs, Ws, t_ids, t_lp, mask), jax.grad(kd, argnums=1)(hs, Ws, t_ids, t_lp, mask)
    ref_jsd, ref_jsd_g = jsd(hs, Ws, ht, Wt, mask), jax.grad(jsd, argnums=1)(hs, Ws, ht, Wt, mask)

    act = named_sharding(mesh, ("batch", None, "act_embed"))
    unemb = named_sharding(mesh, ("embed", "vocab"))
    tok = named_sharding(mesh, ("batch", None))
    tok_k = named_sharding(mesh, ("batch", None, None))
    put = jax.device_put
    s_hs, s_ht, s_Ws, s_Wt = put(hs, act), put(ht, act), put(Ws, unemb), put(Wt, unemb)
    s_mask, s_ids, s_tlp = put(mask, tok), put(np.asarray(t_ids), tok_k), put(np.asarray(t_lp), tok_k)
    with use_rules(mesh, DEFAULT_RULES):
        ids2, tlp2 = jax.jit(lambda h, W: L.teacher_topk(h, W, K, chunk_size=4))(s_ht, s_Wt)
        assert np.array_equal(np.asarray(ids2), np.asarray(t_ids))
        close(tlp2, t_lp, rtol=1e-5, atol=1e-5)
        close(jax.jit(kd)(s_hs, s_Ws, s_ids, s_tlp, s_mask), ref_kd, rtol=1e-5)
        g = jax.jit(jax.grad(kd, argnums=1))(s_hs, s_Ws, s_ids, s_tlp, s_mask)
        close(g, ref_kd_g, rtol=1e-4, atol=1e-6)
        assert g.sharding.is_equivalent_to(s_Ws.sharding, 2)
        close(jax.jit(jsd)(s_hs, s_Ws, s_ht, s_Wt, s_mask), ref_jsd, rtol=1e-5)
        close(jax.jit(jax.grad(jsd, argnums=1))(s_hs, s_Ws, s_ht, s_Wt, s_mask), ref_jsd_g, rtol=1e-4, atol=1e-6)
        # the student side never gathers the vocabulary: only [B, chunk]-sized partial sums cross devices
        for fn, args in ((lambda h, W, i: L.chunked_logps_at(h, W, i, chunk_size=4), (s_hs, s_Ws, s_ids)),
                         (jsd, (s_hs, s_Ws, s_ht, s_Wt, s_mask)),
                         (lambda h, W: L.teacher_topk(h, W, K, chunk_size=4), (s_ht, s_Wt))):
            hlo = jax.jit(fn).lower(*args).compile().as_text()
            assert "all-gather" not in hlo and "all-to-all" not in hlo
