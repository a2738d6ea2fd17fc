"""Preference losses beyond DPO (KTO, SLiC, robust DPO, APO, SPPO, NCA, BCO, SPIN, ORPO, SimPO, CPO) and the
judge labelling, against NumPy transcriptions of their docstring formulas, plus edge cases, micro-batch
invariance and gradients."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jalign.losses as L

from test_losses import _split_sum, close, finite_tree, np_logsig, np_sig


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _inputs(rng, B=11, scale=4.0):
    x = [rng.normal(size=B).astype(np.float32) * scale for _ in range(4)]
    valid = (rng.random(B) > 0.3).astype(np.float32)
    valid[0] = 1.0
    return (*x, valid)


# ============================================================================ reference-based pair losses
def _np_pair(name, a, b, beta, eps=0.1, margin=1.0, shift=0.3):
    d = a - b
    if name == "slic":
        return max(0.0, margin - beta * d)
    if name == "robust":
        return (-(1 - eps) * np_logsig(beta * d) + eps * np_logsig(-beta * d)) / (1 - 2 * eps)
    if name == "apo_zero":
        return (1 - np_sig(beta * a)) + np_sig(beta * b)
    if name == "apo_down":
        return np_sig(beta * a) + (1 - np_sig(beta * d))
    if name == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if name == "nca_pair":
        return -np_logsig(beta * a) - 0.5 * np_logsig(-beta * a) - 0.5 * np_logsig(-beta * b)
    if name == "bco_pair":
        return -np_logsig(beta * a - shift) - np_logsig(-(beta * b - shift))
    if name == "spin":
        return np.log1p(np.exp(-beta * d))
    raise KeyError(name)


PAIR = {
    "slic": lambda *a, beta: L.slic_loss(*a, beta=beta, margin=1.0),
    "robust": lambda *a, beta: L.robust_dpo_loss(*a, beta=beta, label_smoothing=0.1),
    "apo_zero": lambda *a, beta: L.apo_zero_loss(*a, beta=beta),
    "apo_down": lambda *a, beta: L.apo_down_loss(*a, beta=beta),
    "sppo_hard": lambda *a, beta: L.sppo_hard_loss(*a, beta=beta),
    "nca_pair": lambda *a, beta: L.nca_pair_loss(*a, beta=beta),
    "bco_pair": lambda *a, beta: L.bco_pair_loss(*a, beta=beta, delta_shift=0.3),
    "spin": lambda *a, beta: L.spin_loss(*a, lam=beta),
}


@pytest.mark.parametrize("name", list(PAIR))
def test_pair_losses_vs_numpy(rng, name):
    pi_c, pi_r, ref_c, ref_r, valid = _inputs(rng)
    beta = 0.3
    n = valid.sum()
    tot = acc = rc_m = rr_m = 0.0
    for i in range(len(pi_c)):
        if not valid[i]:
            continue
        a = float(pi_c[i]) - float(ref_c[i])
        b = float(pi_r[i]) - float(ref_r[i])
        tot += _np_pair(name, a, b, beta)
        acc += float(a - b > 0)
        rc_m += beta * a
        rr_m += beta * b
    loss, m = PAIR[name](pi_c, pi_r, ref_c, ref_r, valid, beta=beta)
    close(loss, tot / n, rtol=1e-4)
    close(m["loss"], tot / n, rtol=1e-4)
    close(m["accuracy"], acc / n)
    close(m["rewards_chosen_mean"], rc_m / n, rtol=1e-4)
    close(m["rewards_rejected_mean"], rr_m / n, rtol=1e-4)
    close(m["margin_mean"], (rc_m - rr_m) / n, rtol=1e-4)
    assert float(m["num_pairs"]) == n
    if name == "bco_pair":
        close(m["rewards_mean"], 0.5 * (rc_m + rr_m) / n, rtol=1e-4)


@pytest.mark.parametrize("name", list(PAIR))
def test_pair_losses_edge_cases_and_invariance(rng, name):
    pi_c, pi_r, ref_c, ref_r, valid = _inputs(rng)
    B, beta = len(pi_c), 0.25
    f = PAIR[name]
    zero = np.zeros(B, np.float32)
    loss, m = f(pi_c, pi_r, ref_c, ref_r, zero, beta=beta)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in m.values())
    g = jax.grad(lambda x: f(x, pi_r, ref_c, ref_r, zero, beta=beta)[0])(pi_c)
    assert finite_tree(g) and np.all(np.asarray(g) == 0)
    for sign in (1.0, -1.0):  # huge margins: finite loss and gradients
        big = np.full(B, sign * 1e4, np.float32)
        fn = lambda x: f(x, zero, zero, zero, beta=beta)[0]
        assert np.isfinite(float(fn(big))) and finite_tree(jax.grad(fn)(big))
    bad = pi_c.copy()
    bad[~(valid > 0)] = np.nan  # garbage under the mask does not leak
    close(f(bad, pi_r, ref_c, ref_r, valid, beta=beta)[0], f(pi_c, pi_r, ref_c, ref_r, valid, beta=beta)[0])
    # micro-batch sums with the global count equal the big batch
    whole_loss, whole_m = f(pi_c, pi_r, ref_c, ref_r, valid, beta=beta)
    fn = lambda a, b, c, d, v, num_pairs=None: f(a, b, c, d, v, num_pairs, beta=beta)
    s_loss, s_m = _split_sum(fn, [pi_c, pi_r, ref_c, ref_r, valid], "num_pairs", valid.sum())
    close(s_loss, whole_loss)
    for k in whole_m:
        close(s_m[k], whole_m[k])


def test_spin_is_dpo_form_and_policy_equals_opponent(rng):
    pi_c, pi_r, ref_c, ref_r, valid = _inputs(rng)
    close(L.spin_loss(pi_c, pi_r, ref_c, ref_r, valid, lam=0.4)[0],
          L.dpo_loss(pi_c, pi_r, ref_c, ref_r, valid, beta=0.4)[0])
    # policy == opponent: log 2
    close(L.spin_loss(pi_c, pi_r, pi_c, pi_r, lam=0.4)[0], np.log(2.0))


def test_robust_dpo_reduces_to_dpo_and_rejects_bad_eps(rng):
    pi_c, pi_r, ref_c, ref_r, valid = _inputs(rng)
    close(L.robust_dpo_loss(pi_c, pi_r, ref_c, ref_r, valid, beta=0.2, label_smoothing=0.0)[0],
          L.dpo_loss(pi_c, pi_r, ref_c, ref_r, valid, beta=0.2)[0])
    with pytest.raises(ValueError, match="label_smoothing"):
        L.robust_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.2, label_smoothing=0.5)


def test_bco_delta_update():
    d, c = L.bco_delta_update(0.0, 0.0, 2.0, 4.0)
    close(d, 2.0), close(c, 4.0)
    d, c = L.bco_delta_update(d, c, -1.0, 2.0)
    close(d, (2.0 * 4 - 1.0 * 2) / 6), close(c, 6.0)


# ============================================================================ KTO
def test_kto_mismatched_indices():
    idx, kv = L.kto_mismatched_indices(np.array([1, 1, 0, 1, 1]))
    # valid rows 0, 1, 3, 4 take the completion of the previous valid row (cyclically); row 2 stays
    assert idx.tolist() == [4, 0, 2, 1, 3] and kv.tolist() == [1, 1, 0, 1, 1]
    for i in np.nonzero(kv)[0]:
        assert idx[i] != i
    idx, kv = L.kto_mismatched_indices(np.array([0, 1, 0]))
    assert idx.tolist() == [0, 1, 2] and kv.tolist() == [0, 0, 0]


def _np_kto(pi, ref, des, kl, valid, beta, wd, wu):
    z0 = max(0.0, kl)
    tot = 0.0
    for i in range(len(pi)):
        if not valid[i]:
            continue
        r = float(pi[i]) - float(ref[i])
        if des[i]:
            tot += wd - wd * np_sig(beta * (r - z0))
        else:
            tot += wu - wu * np_sig(beta * (z0 - r))
    return tot / valid.sum()


def test_kto_vs_numpy(rng):
    pi, ref, kl_pi, kl_ref, valid = _inputs(rng, B=12)
    des = (rng.random(12) > 0.5).astype(np.float32)
    idx, kv = L.kto_mismatched_indices(valid)
    kv_np = kv * valid
    kl = sum(float(kl_pi[i]) - float(kl_ref[i]) for i in range(12) if kv_np[i]) / kv_np.sum()
    close(L.kto_kl_estimate(kl_pi, kl_ref, kv), kl, rtol=1e-5)
    for kl_in in (kl, -abs(kl) - 1.0, 2.5):  # negative estimates clamp to z0 = 0
        loss, m = L.kto_loss(pi, ref, des, kl_in, valid, beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
        close(loss, _np_kto(pi, ref, des, kl_in, valid, 0.2, 1.3, 0.7), rtol=1e-5)
        close(m["kl"], max(0.0, kl_in))
    n = valid.sum()
    r = (pi - ref).astype(np.float64)
    sel = valid > 0
    close(m["rewards_desirable"], (0.2 * r * des)[sel].sum() / n, rtol=1e-4)
    close(m["rewards_undesirable"], (0.2 * r * (1 - des))[sel].sum() / n, rtol=1e-4)
    close(m["desirable_fraction"], des[sel].sum() / n)
    acc = np.where(des > 0, r > 2.5, r < 2.5)[sel].sum() / n
    close(m["accuracy"], acc)


def test_kto_reference_point_is_detached_and_edges(rng):
    pi, ref, kl_pi, kl_ref, valid = _inputs(rng, B=8)
    des = np.array([1, 0, 1, 0, 1, 1, 0, 0], np.float32)
    # the gradient does not flow through the KL estimate (z0 is a constant)
    g = jax.grad(lambda kp: L.kto_loss(pi, ref, des, L.kto_kl_estimate(kp, kl_ref), valid, beta=0.5)[0])(kl_pi)
    assert np.all(np.asarray(g) == 0)
    # policy == reference and z0 = 0: every completion scores lambda/2
    loss, _ = L.kto_loss(pi, pi, des, 0.0, beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    close(loss, np.mean(np.where(des > 0, 1.0, 0.5)))
    zero = np.zeros(8, np.float32)
    loss, m = L.kto_loss(pi, ref, des, 0.3, zero, beta=0.5)
    assert float(loss) == 0.0 and finite_tree(m)
    big = np.full(8, 1e4, np.float32)
    fn = lambda x: L.kto_loss(x, -x, des, 0.0, beta=0.5)[0]
    assert np.isfinite(float(fn(big))) and finite_tree(jax.grad(fn)(big))
    bad = pi.copy()
    bad[~(valid > 0)] = -np.inf
    close(L.kto_loss(bad, ref, des, 0.3, valid, beta=0.5)[0], L.kto_loss(pi, ref, des, 0.3, valid, beta=0.5)[0])
    # micro-batch invariance given the global reference point
    fn = lambda a, b, d, v, num_seqs=None: L.kto_loss(a, b, d, 0.3, v, num_seqs, beta=0.5)
    whole = fn(pi, ref, des, valid)
    split = _split_sum(fn, [pi, ref, des, valid], "num_seqs", valid.sum())
    close(split[0], whole[0])
    for k in whole[1]:
        close(split[1][k], whole[1][k])
    close(whole[1]["kl"], 0.3)


# ============================================================================ reference-free
def _tok(rng, B, T=6):
    lp = -rng.random((B, T)).astype(np.float32) * 2
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    mask[0] = 1.0
    return lp, mask


def _np_log_odds(lp):
    return lp - np.log1p(-np.exp(lp))


def test_orpo_vs_numpy(rng):
    B = 9
    avg_c = -rng.random(B).astype(np.float32) * 3 - 0.01
    avg_r = -rng.random(B).astype(np.float32) * 3 - 0.01
    valid = (rng.random(B) > 0.3).astype(np.float32)
    valid[0] = 1
    lp, mask = _tok(rng, B)
    lam = 0.1
    n = valid.sum()
    lo = [(_np_log_odds(float(avg_c[i])) - _np_log_odds(float(avg_r[i]))) for i in range(B)]
    pref = lam * sum(-np_logsig(lo[i]) for i in range(B) if valid[i]) / n
    nll = -lp[mask > 0].astype(np.float64).sum() / mask.sum()
    loss, m = L.orpo_loss(avg_c, avg_r, lp, mask, valid, lam=lam)
    close(loss, nll + pref, rtol=1e-4)
    close(m["preference_loss"], pref, rtol=1e-4)
    close(m["nll_loss"], nll, rtol=1e-5)
    close(m["log_odds_ratio"], sum(lo[i] for i in range(B) if valid[i]) / n, rtol=1e-4)
    close(m["accuracy"], sum(float(lo[i] > 0) for i in range(B) if valid[i]) / n)
    # a near-certain sequence (log p ~ 0) and a very unlikely one stay finite, with finite gradients
    edge_c, edge_r = np.array([0.0, -1e-9, -50.0], np.float32), np.array([-50.0, 0.0, -1e-3], np.float32)
    lp3, m3 = lp[:3], mask[:3]
    fn = lambda c, r: L.orpo_loss(c, r, lp3, m3, lam=1.0)[0]
    assert np.isfinite(float(fn(edge_c, edge_r)))
    assert finite_tree(jax.grad(fn, argnums=(0, 1))(edge_c, edge_r))


def test_simpo_vs_numpy(rng):
    B = 10
    avg_c = -rng.random(B).astype(np.float32) * 3
    avg_r = -rng.random(B).astype(np.float32) * 3
    valid = (rng.random(B) > 0.3).astype(np.float32)
    valid[0] = 1
    beta, gamma, eps = 2.0, 0.5, 0.1
    n = valid.sum()
    ref = 0.0
    for i in range(B):
        if valid[i]:
            z = beta * float(avg_c[i]) - beta * float(avg_r[i]) - gamma
            ref += -(1 - eps) * np_logsig(z) - eps * np_logsig(-z)
    loss, m = L.simpo_loss(avg_c, avg_r, valid, beta=beta, gamma=gamma, label_smoothing=eps)
    close(loss, ref / n, rtol=1e-5)
    close(m["rewards_chosen_mean"], beta * avg_c[valid > 0].sum() / n, rtol=1e-5)
    # equal rewards: loss = log(1 + e^gamma) (gamma is a margin the model must beat)
    close(L.simpo_loss(avg_c, avg_c, beta=beta, gamma=gamma)[0], np.log1p(np.exp(gamma)))


def test_cpo_vs_numpy(rng):
    B = 8
    lc = -rng.random(B).astype(np.float32) * 20
    lr = -rng.random(B).astype(np.float32) * 20
    valid = (rng.random(B) > 0.3).astype(np.float32)
    valid[0] = 1
    lp, mask = _tok(rng, B)
    beta, w = 0.1, 0.5
    n = valid.sum()
    pref = sum(-np_logsig(beta * (float(lc[i]) - float(lr[i]))) for i in range(B) if valid[i]) / n
    nll = -lp[mask > 0].astype(np.float64).sum() / mask.sum()
    loss, m = L.cpo_loss(lc, lr, lp, mask, valid, beta=beta, nll_weight=w)
    close(loss, pref + w * nll, rtol=1e-5)
    close(m["preference_loss"], pref, rtol=1e-5)
    close(m["nll_loss"], nll, rtol=1e-5)


@pytest.mark.parametrize("name", ["orpo", "simpo", "cpo"])
def test_reference_free_edges_and_invariance(rng, name):
    B = 9
    avg_c = -rng.random(B).astype(np.float32) * 3 - 0.01
    avg_r = -rng.random(B).astype(np.float32) * 3 - 0.01
    valid = (rng.random(B) > 0.3).astype(np.float32)
    valid[0] = 1
    lp, mask = _tok(rng, B)
    if name == "orpo":
        f = lambda c, r, t, mk, v, num_pairs=None, num_tokens=None: L.orpo_loss(c, r, t, mk, v, num_pairs,
                                                                                  num_tokens, lam=0.2)
    elif name == "cpo":
        f = lambda c, r, t, mk, v, num_pairs=None, num_tokens=None: L.cpo_loss(c, r, t, mk, v, num_pairs,
                                                                                 num_tokens, beta=0.3)
    else:
        f = lambda c, r, t, mk, v, num_pairs=None, num_tokens=None: L.simpo_loss(c, r, v, num_pairs, beta=2.0,
                                                                                   gamma=0.3)
    whole_loss, whole_m = f(avg_c, avg_r, lp, mask, valid)
    h = 4
    parts = [f(avg_c[s], avg_r[s], lp[s], mask[s], valid[s], num_pairs=valid.sum(), num_tokens=mask.sum())
             for s in (slice(0, h), slice(h, None))]
    close(parts[0][0] + parts[1][0], whole_loss)
    for k in whole_m:
        close(parts[0][1][k] + parts[1][1][k], whole_m[k])
    zero = np.zeros(B, np.float32)
    loss, m = f(avg_c, avg_r, lp, np.zeros_like(mask), zero)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in m.values())
    bad = avg_c.copy()
    bad[~(valid > 0)] = np.nan
    close(f(bad, avg_r, lp, mask, valid)[0], whole_loss)
    g = jax.grad(lambda c, t: f(c, avg_r, t, mask, valid)[0], argnums=(0, 1))(avg_c, lp)
    assert finite_tree(g)


# ============================================================================ judge labelling
def test_judge_preference_swap_invariant():
    # (lA_first, lB_first, lA_swapped, lB_swapped) for crafted judges
    cases = np.array([
        [-0.1, -2.5, -3.0, -0.05],   # consistent: prefers response 1 in both orders
        [-0.2, -1.8, -0.2, -1.8],    # pure position bias: always says "A" -> p = 1/2, inconsistent
        [-0.3, -1.4, -0.4, -1.2],    # biased toward A but prefers response 1 overall? (checked numerically)
        [-4.0, -0.01, -0.02, -5.0],  # consistent: prefers response 2
        [-9.0, -9.5, -30.0, -31.0],  # low absolute mass on both tokens: only differences count
    ], np.float32)
    out = L.judge_preference(*cases.T)
    p1 = np_sig(cases[:, 0] - cases[:, 1])
    p2 = np_sig(cases[:, 3] - cases[:, 2])
    p = (p1 + p2) / 2
    close(out["prob_first"], p)
    assert np.asarray(out["label"]).tolist() == [int(x > 0.5) for x in p]
    close(out["confidence"], np.abs(2 * p - 1))
    assert np.asarray(out["consistent"]).tolist() == [1, 0, 0, 1, 0]
    close(out["prob_first"][1], 0.5)
    close(out["confidence"][1], 0.0)
    close(out["position_bias"][1], 0.5 * (p1[1] - p2[1]))
    # swapping the two responses: response 1's first-order slots are response 2's swapped-order slots
    swapped = L.judge_preference(cases[:, 2], cases[:, 3], cases[:, 0], cases[:, 1])
    close(swapped["prob_first"], 1.0 - np.asarray(out["prob_first"]), atol=1e-6)
    close(swapped["confidence"], out["confidence"], atol=1e-6)
    close(swapped["position_bias"], out["position_bias"], atol=1e-6)
    non_tie = np.abs(p - 0.5) > 1e-6
    assert np.all((np.asarray(swapped["label"]) == 1 - np.asarray(out["label"]))[non_tie])
