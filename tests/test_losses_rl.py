"""RL objectives (DAPO clip-higher, GSPO, CISPO, dual-clip PPO, REINFORCE++), DAPO's overlong penalty and
dynamic-sampling filter, and rollout-mismatch importance weights, against NumPy transcriptions, with masks,
all-masked rows, extreme ratios and finite gradients."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jalign.losses as L

from test_losses import _check_invariance, close, finite_tree


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _tokens(rng, B=9, T=7):
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    mask[0] = 0.0  # an all-masked row
    mask[1] = 1.0
    logp = -np.abs(rng.normal(size=(B, T))).astype(np.float32)
    old = (logp + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    return mask, logp, old


def _exact(a, b):
    assert np.array_equal(np.asarray(a), np.asarray(b)), (a, b)


def _np_clip_pg(lp, o, a, lo, hi):
    rho = np.exp(float(lp) - float(o))
    return max(-a * rho, -a * min(max(rho, 1 - lo), 1 + hi)), rho


# ============================================================================ DAPO
def test_dapo_equals_ppo_and_grpo_when_symmetric(rng):
    mask, logp, old = _tokens(rng)
    ref = (logp + rng.normal(size=logp.shape) * 0.2).astype(np.float32)
    adv = rng.normal(size=logp.shape).astype(np.float32)
    for eps in (0.1, 0.2):
        l1, m1 = L.dapo_policy_loss(logp, old, adv, mask, clip_eps_low=eps, clip_eps_high=eps)
        l0, m0 = L.ppo_policy_loss(logp, old, adv, mask, eps)
        _exact(l1, l0)
        for k in m0:
            _exact(m1[k], m0[k])
        l1, m1 = L.grpo_clip_higher_loss(logp, old, ref, adv[:, 0], mask, beta_kl=0.05, clip_eps_low=eps,
                                         clip_eps_high=eps)
        l0, m0 = L.grpo_loss(logp, old, ref, adv[:, 0], mask, eps, 0.05)
        _exact(l1, l0)
        for k in m0:
            _exact(m1[k], m0[k])


def test_dapo_asymmetric_vs_numpy(rng):
    mask, logp, old = _tokens(rng)
    adv = rng.normal(size=logp.shape).astype(np.float32)
    lo, hi = 0.2, 0.28
    n = mask.sum()
    tot = cl = clh = cll = 0.0
    for b, t in zip(*np.nonzero(mask)):
        a = float(adv[b, t])
        per, rho = _np_clip_pg(logp[b, t], old[b, t], a, lo, hi)
        tot += per
        c = float(-a * min(max(rho, 1 - lo), 1 + hi) > -a * rho)
        cl += c
        clh += c * (a > 0)
        cll += c * (a < 0)
    loss, m = L.dapo_policy_loss(logp, old, adv, mask, clip_eps_low=lo, clip_eps_high=hi)
    close(loss, tot / n, rtol=1e-5)
    close(m["clip_fraction"], cl / n)
    close(m["clip_fraction_high"], clh / n)
    close(m["clip_fraction_low"], cll / n)
    # the high side really is wider: a ratio of 1.25 with A > 0 is clipped at 1.2 but not at 1.28
    one = np.ones((1, 1), np.float32)
    lp = np.log(np.float32(1.25)) * one
    assert float(L.dapo_policy_loss(lp, 0 * one, one, one, clip_eps_low=0.2, clip_eps_high=0.28)[1]
                 ["clip_fraction"]) == 0.0
    assert float(L.ppo_policy_loss(lp, 0 * one, one, one, 0.2)[1]["clip_fraction"]) == 1.0


def test_overlong_penalty_and_dynamic_sampling():
    lengths = np.array([0, 10, 12, 13, 16, 19, 20, 25])
    expected = [0.0, 0.0, 0.0, -0.125, -0.5, -0.875, -1.0, -1.0]  # L_max 20, buffer 8: linear from 12 to 20
    close(L.overlong_penalty(lengths, max_length=20, overlong_buffer=8), expected)
    close(L.overlong_penalty(lengths, max_length=20, overlong_buffer=8, penalty_factor=0.5),
          0.5 * np.array(expected))
    with pytest.raises(ValueError, match="overlong_buffer"):
        L.overlong_penalty(lengths, max_length=20, overlong_buffer=0)
    r = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.25]], np.float32)
    assert np.asarray(L.dynamic_sampling_keep(r)).tolist() == [False, False, True, True]
    # a dropped group has exactly zero group-normalised advantage: nothing is lost by dropping it
    adv = np.asarray(L.grpo_advantages(r))
    assert np.all(adv[~np.asarray(L.dynamic_sampling_keep(r))] == 0)


# ============================================================================ GSPO
def _np_gspo(logp, old, adv, mask, lo, hi):
    tot = clip = ratio = 0.0
    rows = [b for b in range(mask.shape[0]) if mask[b].sum() > 0]
    for b in rows:
        toks = [t for t in range(mask.shape[1]) if mask[b, t]]
        s = np.exp(np.mean([float(logp[b, t]) - float(old[b, t]) for t in toks]))
        a = float(adv[b])
        l1, l2 = -a * s, -a * min(max(s, 1 - lo), 1 + hi)
        tot += max(l1, l2)
        clip += float(l2 > l1)
        ratio += s
    n = len(rows)
    return tot / n, clip / n, ratio / n, n


def test_gspo_vs_numpy_and_edges(rng):
    mask, logp, old = _tokens(rng)
    adv = rng.normal(size=mask.shape[0]).astype(np.float32)
    lo, hi = 0.02, 0.03
    ref_loss, ref_clip, ref_ratio, n = _np_gspo(logp, old, adv, mask, lo, hi)
    loss, m = L.gspo_loss(logp, old, adv, mask, clip_eps_low=lo, clip_eps_high=hi)
    close(loss, ref_loss, rtol=1e-5)
    close(m["clip_fraction"], ref_clip)
    close(m["seq_ratio_mean"], ref_ratio, rtol=1e-5)
    assert float(m["num_seqs"]) == n
    _check_invariance(lambda a, b, c, d, num_seqs=None: L.gspo_loss(a, b, c, d, num_seqs, clip_eps_low=lo,
                                                                      clip_eps_high=hi),
                      [logp, old, adv, mask], "num_seqs", n)
    bad = logp.copy()
    bad[mask == 0] = -np.inf
    close(L.gspo_loss(bad, old, adv, mask, clip_eps_low=lo, clip_eps_high=hi)[0], loss)
    z = np.zeros_like(mask)
    assert float(L.gspo_loss(logp, old, adv, z)[0]) == 0.0
    assert finite_tree(jax.grad(lambda x: L.gspo_loss(x, old, adv, z)[0])(logp))
    big = np.where(mask > 0, 1e4, 0.0).astype(np.float32)
    f = lambda x: L.gspo_loss(x, -big, adv, mask)[0]
    assert np.isfinite(float(f(big))) and finite_tree(jax.grad(f)(big))
    assert finite_tree(jax.grad(lambda x: L.gspo_loss(x, old, adv, mask, clip_eps_low=lo,
                                                      clip_eps_high=hi)[0])(logp))


def test_gspo_one_token_equals_token_ppo(rng):
    B = 12
    logp = -np.abs(rng.normal(size=(B, 1))).astype(np.float32)
    old = (logp + rng.normal(size=(B, 1)) * 0.4).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    mask = np.ones((B, 1), np.float32)
    mask[3] = 0.0
    for eps in (0.1, 0.2):
        g, gm = L.gspo_loss(logp, old, adv, mask, clip_eps_low=eps, clip_eps_high=eps)
        p, pm = L.ppo_policy_loss(logp, old, adv, mask, eps)
        close(g, p, rtol=1e-6)
        close(gm["clip_fraction"], pm["clip_fraction"])
        gg = jax.grad(lambda x: L.gspo_loss(x, old, adv, mask, clip_eps_low=eps, clip_eps_high=eps)[0])(logp)
        gp = jax.grad(lambda x: L.ppo_policy_loss(x, old, adv, mask, eps)[0])(logp)
        close(gg, gp, rtol=1e-5)


# ============================================================================ CISPO, dual clip
def test_cispo_vs_numpy_and_gradient(rng):
    mask, logp, old = _tokens(rng)
    adv = rng.normal(size=mask.shape[0]).astype(np.float32)
    hi, lo = 0.3, 0.5
    n = mask.sum()
    w = np.clip(np.exp(logp.astype(np.float64) - old), 1 - lo, 1 + hi)
    loss, m = L.cispo_loss(logp, old, adv, mask, clip_eps_high=hi, clip_eps_low=lo)
    close(loss, -(w * adv[:, None] * logp)[mask > 0].sum() / n, rtol=1e-5)
    close(m["is_weight_mean"], w[mask > 0].sum() / n, rtol=1e-5)
    close(m["clip_fraction"], (w != np.exp(logp.astype(np.float64) - old))[mask > 0].sum() / n)
    # the weight is a constant: d/dlogp = -w A / N on every valid token, even where the weight is truncated
    g = jax.grad(lambda x: L.cispo_loss(x, old, adv, mask, clip_eps_high=hi, clip_eps_low=lo)[0])(logp)
    close(g, np.where(mask > 0, -w * adv[:, None] / n, 0.0), rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(g)[(mask > 0) & (w == 1 + hi) & (adv[:, None] != 0)] != 0)
    big = np.where(mask > 0, 1e4, 0.0).astype(np.float32)
    f = lambda x: L.cispo_loss(x, -big, adv, mask, clip_eps_high=hi)[0]
    assert np.isfinite(float(f(big))) and finite_tree(jax.grad(f)(big))
    assert float(L.cispo_loss(logp, old, adv, np.zeros_like(mask), clip_eps_high=hi)[0]) == 0.0
    _check_invariance(lambda a, b, c, d, num_tokens=None: L.cispo_loss(a, b, c, d, num_tokens, clip_eps_high=hi),
                      [logp, old, adv, mask], "num_tokens", n)


def test_dual_clip_vs_numpy(rng):
    mask, logp, old = _tokens(rng)
    logp = (logp + np.where(rng.random(logp.shape) > 0.6, 2.0, 0.0)).astype(np.float32)  # some ratios > c
    adv = rng.normal(size=logp.shape).astype(np.float32)
    c, eps = 3.0, 0.2
    n = mask.sum()
    tot = dual = 0.0
    for b, t in zip(*np.nonzero(mask)):
        a = float(adv[b, t])
        per, _ = _np_clip_pg(logp[b, t], old[b, t], a, eps, eps)
        if a < 0 and per > -c * a:
            per, dual = -c * a, dual + 1
        tot += per
    loss, m = L.dual_clip_ppo_loss(logp, old, adv, mask, dual_clip=c)
    close(loss, tot / n, rtol=1e-5)
    close(m["dual_clip_fraction"], dual / n)
    assert dual > 0
    # never larger than PPO's loss, equal where no negative-advantage token hits the bound
    assert float(loss) <= float(L.ppo_policy_loss(logp, old, adv, mask, eps)[0]) + 1e-6
    pos = np.abs(adv)
    _exact(L.dual_clip_ppo_loss(logp, old, pos, mask)[0], L.ppo_policy_loss(logp, old, pos, mask)[0])
    big = np.where(mask > 0, 1e4, 0.0).astype(np.float32)
    f = lambda x: L.dual_clip_ppo_loss(x, -big, adv, mask)[0]
    assert np.isfinite(float(f(big))) and finite_tree(jax.grad(f)(big))
    with pytest.raises(ValueError, match="dual_clip"):
        L.dual_clip_ppo_loss(logp, old, adv, mask, dual_clip=1.0)


# ============================================================================ REINFORCE++
def test_reinforce_pp_advantages_vs_numpy(rng):
    mask, logp, old = _tokens(rng)
    mask[2] = np.array([0, 0, 1, 1, 1, 0, 0], np.float32)
    B, T = mask.shape
    score = rng.normal(size=B).astype(np.float32)
    kl = (rng.normal(size=(B, T)) * 0.1).astype(np.float32)
    beta, gamma = 0.05, 0.9
    G = np.zeros((B, T))
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        r = {t: -beta * kl[b, t] + (score[b] if t == toks[-1] else 0.0) for t in toks}
        acc = 0.0
        for t in reversed(toks):
            acc = r[t] + gamma * acc
            G[b, t] = acc
    sel = G[mask > 0]
    ref = np.where(mask > 0, (G - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8), 0.0)
    adv = L.reinforce_pp_advantages(score, mask, kl, beta_kl=beta, gamma=gamma)
    close(adv, ref, rtol=1e-4, atol=1e-5)
    # global statistics from two halves' moments == whole-batch normalisation
    r1 = L.reinforce_pp_advantages(score[:4], mask[:4], kl[:4], beta_kl=beta, gamma=gamma)
    ret = lambda s, m, k: L.gae(L.token_rewards(s, m, k, beta), np.zeros_like(m), m, gamma, 1.0)[0]
    mom = tuple(a + b for a, b in zip(L.masked_moments(ret(score[:4], mask[:4], kl[:4]), mask[:4]),
                                      L.masked_moments(ret(score[4:], mask[4:], kl[4:]), mask[4:])))
    halves = np.concatenate([L.reinforce_pp_advantages(score[:4], mask[:4], kl[:4], beta_kl=beta, gamma=gamma,
                                                       moments=mom),
                             L.reinforce_pp_advantages(score[4:], mask[4:], kl[4:], beta_kl=beta, gamma=gamma,
                                                       moments=mom)])
    close(halves, adv, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(r1), np.asarray(adv)[:4])  # local statistics differ: the test can fail
    assert finite_tree(L.reinforce_pp_advantages(score, np.zeros_like(mask), kl, beta_kl=beta))


def test_reinforce_pp_baseline_and_loss(rng):
    P, K, T = 3, 4, 5
    r = rng.normal(size=(P, K)).astype(np.float32)
    mask = (rng.random((P * K, T)) > 0.3).astype(np.float32)
    mask[:, 0] = 1.0
    a = np.repeat((r - r.mean(-1, keepdims=True)).reshape(-1, 1), T, 1)
    sel = a[mask > 0]
    ref = np.where(mask > 0, (a - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8), 0.0)
    close(L.reinforce_pp_baseline_advantages(r, mask), ref, rtol=1e-4, atol=1e-5)
    logp = -np.abs(rng.normal(size=(P * K, T))).astype(np.float32)
    old = logp + 0.1
    l0 = L.ppo_policy_loss(logp, old, ref.astype(np.float32), mask, 0.2)
    l1 = L.reinforce_pp_loss(logp, old, ref.astype(np.float32), mask, clip_eps=0.2)
    _exact(l1[0], l0[0])


# ============================================================================ rollout mismatch
def test_token_tis_weights_vs_numpy(rng):
    mask, old, smp = _tokens(rng)
    smp = smp.copy()
    smp[1, 0] = old[1, 0] - 3.0  # a token whose ratio is e^3 > cap
    cap = 2.0
    n = mask.sum()
    ratio = np.exp(old.astype(np.float64) - smp)
    w, m = L.token_tis_weights(old, smp, mask, cap=cap)
    close(w, np.where(mask > 0, np.minimum(ratio, cap), 0.0), rtol=1e-5)
    close(m["is_weight_mean"], np.minimum(ratio, cap)[mask > 0].sum() / n, rtol=1e-5)
    close(m["is_truncated_fraction"], (ratio > cap)[mask > 0].sum() / n)
    close(m["is_weight_max"], ratio[mask > 0].max(), rtol=1e-5)
    d = (old.astype(np.float64) - smp)[mask > 0]
    close(m["logprob_abs_diff_mean"], np.abs(d).mean(), rtol=1e-5)
    close(m["logprob_abs_diff_max"], np.abs(d).max(), rtol=1e-5)
    close(m["mismatch_kl"], (-d).mean(), rtol=1e-5)
    close(m["mismatch_k3"], (np.exp(d) - 1 - d).mean(), rtol=1e-4)
    seq = [(old[b] - smp[b].astype(np.float64))[mask[b] > 0].sum() for b in range(mask.shape[0]) if mask[b].sum()]
    close(m["mismatch_seq_log_ratio"], np.mean(seq), rtol=1e-5)
    assert float(m["num_seqs"]) == len(seq)
    # detached: weighting a loss by w adds no gradient path through the log-probs
    g = jax.grad(lambda x: jnp.sum(L.token_tis_weights(x, smp, mask)[0]))(old)
    assert np.all(np.asarray(g) == 0)
    # garbage under the mask, all masked, extreme ratios
    bad = old.copy()
    bad[mask == 0] = np.inf
    close(L.token_tis_weights(bad, smp, mask)[0], w)
    w0, m0 = L.token_tis_weights(old, smp, np.zeros_like(mask))
    assert float(np.abs(np.asarray(w0)).sum()) == 0 and all(float(v) == 0 for v in m0.values())
    big = np.where(mask > 0, 1e4, -1e4).astype(np.float32)
    w_big, m_big = L.token_tis_weights(big, -big, mask, cap=cap)
    assert finite_tree((w_big, m_big)) and float(np.max(np.asarray(w_big))) == cap


def test_sequence_tis_and_mis_weights_vs_numpy(rng):
    mask, old, smp = _tokens(rng)
    smp = smp.copy()
    smp[1] = old[1] - 0.5  # a sequence with ratio e^3.5 > cap
    cap = 2.0
    rows = [b for b in range(mask.shape[0]) if mask[b].sum()]
    rho = np.array([np.exp(((old[b] - smp[b].astype(np.float64)) * mask[b]).sum()) for b in range(mask.shape[0])])
    w, m = L.sequence_tis_weights(old, smp, mask, cap=cap)
    close(w, np.where(mask.sum(-1) > 0, np.minimum(rho, cap), 0.0), rtol=1e-5)
    close(m["is_weight_mean"], np.minimum(rho, cap)[rows].mean(), rtol=1e-5)
    close(m["is_truncated_fraction"], (rho[rows] > cap).mean())
    keep = (rho <= cap) & (rho >= 1 / cap) & (mask.sum(-1) > 0)
    w2, m2 = L.sequence_mis_weights(old, smp, mask, cap=cap)
    close(w2, np.where(keep, rho, 0.0), rtol=1e-5)
    close(m2["is_masked_fraction"], (~keep[rows]).mean())
    assert float(w2[1]) == 0.0 and float(w[1]) == cap
    w3, _ = L.sequence_mis_weights(old, smp, mask, cap=cap, lower=0.0)
    close(w3, np.where((rho <= cap) & (mask.sum(-1) > 0), rho, 0.0), rtol=1e-5)
    for fn in (L.sequence_tis_weights, L.sequence_mis_weights):
        big = np.where(mask > 0, 1e4, 0.0).astype(np.float32)
        wb, mb = fn(big, -big, mask, cap=cap)
        assert finite_tree((wb, mb))
        w0, m0 = fn(old, smp, np.zeros_like(mask))
        assert float(np.abs(np.asarray(w0)).sum()) == 0 and all(float(v) == 0 for v in m0.values())
        assert np.all(np.asarray(jax.grad(lambda x: jnp.sum(fn(x, smp, mask)[0]))(old)) == 0)
