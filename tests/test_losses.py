"""jalign.losses against independent NumPy transcriptions of the docstring formulas, plus edge cases,
micro-batch invariance, gradients, sharded log-probs and import-lightness."""
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jalign.losses as L

RTOL, ATOL = 1e-5, 1e-5


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


def np_logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_sig(x):
    return np.exp(np_logsig(x))


def finite_tree(t):
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(t))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ============================================================================ import lightness
def test_import_is_light():
    code = ("import jalign.losses, sys; "
            "bad = [m for m in ('flax', 'grain', 'optax', 'orbax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ============================================================================ reward models
def _pairs(rng, B=12, scale=3.0):
    rc = rng.normal(size=B) * scale
    rr = rng.normal(size=B) * scale
    valid = (rng.random(B) > 0.25).astype(np.float32)
    valid[0] = 1.0
    return rc.astype(np.float32), rr.astype(np.float32), valid


def _np_pair_metrics(rc, rr, valid, n):
    acc = sum(float(rc[i] > rr[i]) for i in range(len(rc)) if valid[i]) / n
    return {
        "accuracy": acc,
        "reward_chosen_mean": sum(rc[i] for i in range(len(rc)) if valid[i]) / n,
        "reward_rejected_mean": sum(rr[i] for i in range(len(rc)) if valid[i]) / n,
        "margin_mean": sum(rc[i] - rr[i] for i in range(len(rc)) if valid[i]) / n,
        "num_pairs": valid.sum(),
    }


@pytest.mark.parametrize("kind", ["bt", "margin", "scaled"])
def test_bt_losses_vs_numpy(rng, kind):
    rc, rr, valid = _pairs(rng)
    extra = rng.uniform(0.0, 3.0, size=rc.shape).astype(np.float32)
    n = valid.sum()
    ref = 0.0
    for i in range(len(rc)):
        if not valid[i]:
            continue
        if kind == "bt":
            ref += -np_logsig(rc[i] - rr[i])
        elif kind == "margin":
            ref += -np_logsig(rc[i] - rr[i] - extra[i])
        else:
            ref += -extra[i] * np_logsig(rc[i] - rr[i])
    ref /= n
    if kind == "bt":
        loss, m = L.bt_loss(rc, rr, valid)
    elif kind == "margin":
        loss, m = L.bt_margin_loss(rc, rr, extra, valid)
    else:
        loss, m = L.bt_scaled_loss(rc, rr, extra, valid)
    close(loss, ref)
    close(m["loss"], ref)
    for k, v in _np_pair_metrics(rc, rr, valid, n).items():
        close(m[k], v)


def test_bt_accuracy_ties_count_zero():
    r = np.array([1.0, 2.0, 3.0, 0.0], np.float32)
    _, m = L.bt_loss(r, r)
    close(m["accuracy"], 0.0)
    _, m = L.bt_loss(r, r - np.array([1, 0, -1, 1], np.float32))
    close(m["accuracy"], 0.5)


def test_regression_loss_vs_numpy(rng):
    B, A = 7, 4
    pred = rng.normal(size=(B, A)).astype(np.float32)
    target = rng.normal(size=(B, A)).astype(np.float32)
    mask = (rng.random((B, A)) > 0.3).astype(np.float32)
    mask[:, 2] = 0.0  # an attribute never labelled
    n = mask.sum()
    sq = ab = 0.0
    per_attr = np.zeros(A)
    for b in range(B):
        for a in range(A):
            if mask[b, a]:
                sq += (pred[b, a] - target[b, a]) ** 2
                ab += abs(pred[b, a] - target[b, a])
                per_attr[a] += abs(pred[b, a] - target[b, a])
    counts = mask.sum(0)
    loss, m = L.regression_loss(pred, target, mask)
    close(loss, sq / n)
    close(m["mae"], ab / n)
    for a in range(A):
        close(m[f"mae_attr_{a}"], per_attr[a] / counts[a] if counts[a] else 0.0)
    assert finite_tree(jax.grad(lambda p: L.regression_loss(p, target, mask)[0])(pred))


# ============================================================================ DPO family
def _dpo_inputs(rng, B=10, scale=5.0):
    x = [rng.normal(size=B).astype(np.float32) * scale for _ in range(4)]
    valid = (rng.random(B) > 0.3).astype(np.float32)
    valid[0] = 1.0
    return (*x, valid)


def _np_bern_kl(p, q):  # KL(Bern(p) || Bern(q)), float64
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def _np_pref(name, pi_c, pi_r, ref_c, ref_r, valid, beta, eps=0.0, eta=1.0, R_c=None, R_r=None):
    B = len(pi_c)
    R_c = np.ones(B) if R_c is None else R_c
    R_r = np.zeros(B) if R_r is None else R_r
    n = valid.sum()
    tot, out = 0.0, {"accuracy": 0.0, "rewards_chosen_mean": 0.0, "rewards_rejected_mean": 0.0, "margin_mean": 0.0}
    for i in range(B):
        if not valid[i]:
            continue
        d = (float(pi_c[i]) - ref_c[i]) - (float(pi_r[i]) - ref_r[i])
        target = eta * (R_c[i] - R_r[i])
        if name == "dpo":
            per = -(1 - eps) * np_logsig(beta * d) - eps * np_logsig(-beta * d)
        elif name == "ipo":
            per = (d - 1 / (2 * beta)) ** 2
        elif name == "rpo_sq":
            per = (beta * d - target) ** 2
        elif name == "rpo_fwd_kl":  # NeMo-Aligner: KL(model || target)
            per = _np_bern_kl(np_sig(beta * d), np_sig(target))
        elif name == "rpo_bwd_kl":  # NeMo-Aligner / Nemotron-4 D: KL(target || model)
            per = _np_bern_kl(np_sig(target), np_sig(beta * d))
        tot += per
        out["accuracy"] += float(d > 0)
        out["rewards_chosen_mean"] += beta * (pi_c[i] - ref_c[i])
        out["rewards_rejected_mean"] += beta * (pi_r[i] - ref_r[i])
        out["margin_mean"] += beta * d
    out = {k: v / n for k, v in out.items()}
    out["loss"] = out["preference_loss"] = tot / n
    out["num_pairs"] = n
    return out


PREF = {
    "dpo": lambda *a, **k: L.dpo_loss(*a, beta=k["beta"], label_smoothing=k.get("eps", 0.0)),
    "ipo": lambda *a, **k: L.ipo_loss(*a, beta=k["beta"]),
    "rpo_sq": lambda *a, **k: L.rpo_sq_loss(*a, beta=k["beta"], eta=k.get("eta", 1.0),
                                            reward_chosen=k.get("R_c"), reward_rejected=k.get("R_r")),
    "rpo_fwd_kl": lambda *a, **k: L.rpo_fwd_kl_loss(*a, beta=k["beta"], eta=k.get("eta", 1.0),
                                                    reward_chosen=k.get("R_c"), reward_rejected=k.get("R_r")),
    "rpo_bwd_kl": lambda *a, **k: L.rpo_bwd_kl_loss(*a, beta=k["beta"], eta=k.get("eta", 1.0),
                                                    reward_chosen=k.get("R_c"), reward_rejected=k.get("R_r")),
}


@pytest.mark.parametrize("name", list(PREF))
@pytest.mark.parametrize("with_rewards", [False, True])
def test_preference_losses_vs_numpy(rng, name, with_rewards):
    pi_c, pi_r, ref_c, ref_r, valid = _dpo_inputs(rng)
    kw = {"beta": 0.3, "eps": 0.1 if with_rewards else 0.0, "eta": 0.7}
    if with_rewards:
        kw["R_c"] = rng.normal(size=len(pi_c)).astype(np.float32)
        kw["R_r"] = rng.normal(size=len(pi_c)).astype(np.float32)
    loss, m = PREF[name](pi_c, pi_r, ref_c, ref_r, valid, **kw)
    ref = _np_pref(name, pi_c, pi_r, ref_c, ref_r, valid, kw["beta"], eps=kw["eps"], eta=kw["eta"],
                   R_c=kw.get("R_c"), R_r=kw.get("R_r"))
    close(loss, ref["loss"], rtol=1e-4)
    assert set(ref) <= set(m)
    for k, v in ref.items():
        close(m[k], v, rtol=1e-4)


@pytest.mark.parametrize("name", list(PREF))
def test_preference_edge_cases(rng, name):
    B, beta = 6, 0.25
    pi_c, pi_r, ref_c, ref_r, _ = _dpo_inputs(rng, B)
    # all masked -> exactly 0 loss and metrics, finite gradients
    zero = np.zeros(B, np.float32)
    loss, m = PREF[name](pi_c, pi_r, ref_c, ref_r, zero, beta=beta)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in m.values())
    g = jax.grad(lambda x: PREF[name](x, pi_r, ref_c, ref_r, zero, beta=beta)[0])(pi_c)
    assert finite_tree(g) and np.all(np.asarray(g) == 0)
    # large |delta|: no overflow, finite gradients
    for sign in (1.0, -1.0):
        big = np.full(B, sign * 1e4, np.float32)
        f = lambda x: PREF[name](x, zero, zero, zero, beta=beta)[0]
        loss = f(big)
        grads = jax.grad(f)(big)
        assert np.isfinite(float(loss)) and finite_tree(grads), (name, sign, loss, grads)
    # invalid pairs carrying garbage do not leak
    valid = np.ones(B, np.float32)
    valid[-1] = 0.0
    bad = pi_c.copy()
    bad[-1] = -np.inf
    loss_bad, _ = PREF[name](bad, pi_r, ref_c, ref_r, valid, beta=beta)
    loss_ok, _ = PREF[name](pi_c, pi_r, ref_c, ref_r, valid, beta=beta)
    close(loss_bad, loss_ok)


def test_policy_equals_reference():
    B, beta = 5, 0.2
    x = np.random.default_rng(1).normal(size=B).astype(np.float32) * 10
    loss, m = L.dpo_loss(x, x + 1, x, x + 1, beta=beta)
    close(loss, np.log(2.0))
    close(m["accuracy"], 0.0)  # ties count 0
    close(L.dpo_loss(x, x, x, x, beta=beta, label_smoothing=0.3)[0], np.log(2.0))
    close(L.ipo_loss(x, x, x, x, beta=beta)[0], 1 / (4 * beta ** 2), rtol=1e-6)
    close(L.rpo_sq_loss(x, x, x, x, beta=beta, eta=2.0)[0], 4.0)  # (0 - 2*(1-0))^2
    close(L.rpo_bwd_kl_loss(x, x, x, x, beta=beta, reward_chosen=np.zeros(B), reward_rejected=np.zeros(B))[0], 0.0)


def test_rpo_kl_direction():
    """fwd = KL(model || target), bwd = KL(target || model), the NeMo-Aligner orientation."""
    beta, d, tgt = 1.0, np.array([2.0], np.float32), np.array([-1.0], np.float32)
    q, p = np_sig(2.0), np_sig(-1.0)
    kw = dict(beta=beta, reward_chosen=tgt, reward_rejected=np.zeros(1, np.float32))
    z = np.zeros(1, np.float32)
    close(L.rpo_fwd_kl_loss(d, z, z, z, **kw)[0], _np_bern_kl(q, p))
    close(L.rpo_bwd_kl_loss(d, z, z, z, **kw)[0], _np_bern_kl(p, q))


def test_dpo_sft_terms(rng):
    B, T = 4, 6
    lp = -rng.random((B, T)).astype(np.float32)
    mask = (rng.random((B, T)) > 0.4).astype(np.float32)
    ref = -sum(lp[b, t] for b in range(B) for t in range(T) if mask[b, t]) / mask.sum()
    close(L.dpo_sft_term(lp, mask)[0], ref)
    close(L.dpo_sft_term(lp, mask, num_tokens=100.0)[0], ref * mask.sum() / 100.0)
    seq = lp.sum(-1)
    valid = np.array([1, 0, 1, 1], np.float32)
    close(L.dpo_sft_seq_term(seq, valid)[0], -(seq[0] + seq[2] + seq[3]) / 3)


# ============================================================================ micro-batch invariance
def _split_sum(fn, arrays, count_kw, count):
    """fn(*arrays[:h], count) + fn(*arrays[h:], count), for losses and each metric."""
    B = arrays[0].shape[0]
    h = B // 2 - 1  # uneven split
    parts = [fn(*[a[:h] for a in arrays], **{count_kw: count}), fn(*[a[h:] for a in arrays], **{count_kw: count})]
    loss = sum(p[0] for p in parts)
    metrics = {k: sum(p[1][k] for p in parts) for k in parts[0][1]}
    return loss, metrics


def _check_invariance(fn, arrays, count_kw, count):
    whole_loss, whole_m = fn(*arrays)
    loss, m = _split_sum(fn, arrays, count_kw, count)
    close(loss, whole_loss)
    assert set(m) == set(whole_m)
    for k in whole_m:
        close(m[k], whole_m[k])


@pytest.mark.parametrize("name", list(PREF) + ["bt", "bt_margin", "bt_scaled", "sft_seq"])
def test_pair_losses_microbatch_invariance(rng, name):
    pi_c, pi_r, ref_c, ref_r, valid = _dpo_inputs(rng, 11)
    n = valid.sum()
    if name in PREF:
        fn = lambda a, b, c, d, v, num_pairs=None: PREF[name](a, b, c, d, v, num_pairs, beta=0.3)
        _check_invariance(fn, [pi_c, pi_r, ref_c, ref_r, valid], "num_pairs", n)
    elif name == "sft_seq":
        _check_invariance(L.dpo_sft_seq_term, [pi_c, valid], "num_pairs", n)
    elif name == "bt":
        _check_invariance(L.bt_loss, [pi_c, pi_r, valid], "num_pairs", n)
    else:
        s = np.abs(ref_c)
        fn = L.bt_margin_loss if name == "bt_margin" else L.bt_scaled_loss
        _check_invariance(lambda a, b, c, v, num_pairs=None: fn(a, b, c, v, num_pairs), [pi_c, pi_r, s, valid],
                          "num_pairs", n)


def _tokens(rng, B=9, T=7):
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    mask[0] = 0.0  # zero-length response
    mask[1, :] = 1.0
    arr = lambda s=1.0: (rng.normal(size=(B, T)) * s).astype(np.float32)
    return mask, arr


def test_token_losses_microbatch_invariance(rng):
    mask, arr = _tokens(rng)
    n = mask.sum()
    logp, old, ref = -np.abs(arr()), -np.abs(arr()), -np.abs(arr())
    adv, v, v_old, g = arr(), arr(), arr(), arr()
    adv_seq = arr()[:, 0]
    cases = [
        (lambda a, b, c, m, num_tokens=None: L.ppo_policy_loss(a, b, c, m, 0.2, num_tokens), [logp, old, adv, mask]),
        (lambda a, b, c, m, num_tokens=None: L.ppo_value_loss(a, b, c, m, 0.2, num_tokens), [v, v_old, g, mask]),
        (lambda a, m, num_tokens=None: L.entropy_bonus(a, m, 0.01, num_tokens), [np.abs(v), mask]),
        (lambda a, b, m, num_tokens=None: L.reinforce_loss(a, b, m, num_tokens), [logp, adv_seq, mask]),
        (lambda a, b, c, d, m, num_tokens=None: L.grpo_loss(a, b, c, d, m, 0.2, 0.05, num_tokens),
         [logp, old, ref, adv_seq, mask]),
        (L.sft_loss, [logp, mask]),
        (L.dpo_sft_term, [logp, mask]),
    ]
    for fn, arrays in cases:
        _check_invariance(fn, arrays, "num_tokens", n)
    # regression RM: split over sequences with a global value count
    _check_invariance(lambda p, t, m, num_values=None: L.regression_loss(p, t, m, num_values,
                                                                            num_values_per_attr=mask.sum(0)),
                      [v, g, mask], "num_values", n)


# ============================================================================ PPO / RL math
def test_kl_estimators(rng):
    mask, arr = _tokens(rng)
    lp, rf = -np.abs(arr()), -np.abs(arr())
    B, T = lp.shape
    for b in range(B):
        for t in range(T):
            d = float(rf[b, t]) - float(lp[b, t])
            close(L.kl_k1(lp, rf)[b, t], lp[b, t] - rf[b, t])
            close(L.kl_abs(lp, rf)[b, t], abs(lp[b, t] - rf[b, t]))
            close(L.kl_k2(lp, rf)[b, t], 0.5 * d * d)
            close(L.kl_k3(lp, rf)[b, t], np.exp(d) - d - 1)
    close(L.kl_k3(lp, rf, mask), np.where(mask > 0, np.exp(rf - lp) - (rf - lp) - 1, 0.0))
    assert np.all(np.asarray(L.kl_k3(lp, rf)) >= 0)
    big = L.kl_k3(jnp.zeros(3), jnp.array([1e4, -1e4, 0.0]))
    assert finite_tree(big)
    assert finite_tree(jax.grad(lambda x: L.kl_k3(x, jnp.array([1e4, -1e4, 0.0])).sum())(jnp.zeros(3)))


def test_token_rewards(rng):
    mask, arr = _tokens(rng)
    mask[2] = np.array([0, 0, 1, 1, 1, 0, 0], np.float32)  # prompt then response then padding
    kl = arr()
    score = arr()[:, 0]
    out = np.asarray(L.token_rewards(score, mask, kl, 0.1))
    B, T = mask.shape
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t] > 0]
        for t in range(T):
            exp = 0.0
            if mask[b, t] > 0:
                exp = -0.1 * kl[b, t] + (score[b] if t == valid[-1] else 0.0)
            close(out[b, t], exp)
    assert np.all(out[0] == 0)


def _gae_loop(r, v, m, gamma, lam):
    B, T = r.shape
    adv = np.zeros((B, T))
    for b in range(B):
        next_v = next_a = 0.0
        for t in reversed(range(T)):
            if m[b, t] <= 0:
                continue
            delta = r[b, t] + gamma * next_v - v[b, t]
            a = delta + gamma * lam * next_a
            adv[b, t] = a
            next_v, next_a = v[b, t], a
    return adv, np.where(m > 0, adv + v, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_vs_loop(rng, gamma, lam):
    mask, arr = _tokens(rng, B=6, T=9)
    mask[2] = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0], np.float32)  # right padded
    mask[3] = np.array([0, 0, 1, 1, 1, 1, 1, 0, 0], np.float32)  # prompt + padding
    mask[4] = np.array([0, 0, 1, 1, 0, 1, 1, 0, 0], np.float32)  # a hole: skipped
    r, v = arr(), arr()
    adv, ret = L.gae(r, v, mask, gamma, lam)
    ref_adv, ref_ret = _gae_loop(r.astype(np.float64), v.astype(np.float64), mask, gamma, lam)
    close(adv, ref_adv, rtol=1e-4)
    close(ret, ref_ret, rtol=1e-4)
    assert np.all(np.asarray(adv)[0] == 0)
    # right-padded row against the closed form A_t = sum_l (gamma lam)^l delta_{t+l}, V_L = 0
    n = 4
    vv = np.append(v[2, :n].astype(np.float64), 0.0)
    delta = r[2, :n] + gamma * vv[1:] - vv[:-1]
    closed = [sum((gamma * lam) ** l * delta[t + l] for l in range(n - t)) for t in range(n)]
    close(np.asarray(adv)[2, :n], closed, rtol=1e-4)
    assert finite_tree(jax.jit(jax.grad(lambda x: L.gae(r, x, mask)[0].sum()))(v))


def test_whiten(rng):
    mask, arr = _tokens(rng)
    x = arr(3.0) + 5.0
    sel = x[mask > 0].astype(np.float64)
    mu, var = sel.mean(), sel.var(ddof=1)
    out = L.whiten(x, mask)
    close(out, np.where(mask > 0, (x - mu) / np.sqrt(var + 1e-8), 0.0), rtol=1e-4, atol=1e-4)
    out = L.whiten(x, mask, shift_mean=False)
    close(out, np.where(mask > 0, (x - mu) / np.sqrt(var + 1e-8) + mu, 0.0), rtol=1e-4, atol=1e-4)
    # global moments from the two halves == whole-batch whitening of each half
    m1, m2 = L.masked_moments(x[:4], mask[:4]), L.masked_moments(x[4:], mask[4:])
    glob = tuple(a + b for a, b in zip(m1, m2))
    close(np.concatenate([L.whiten(x[:4], mask[:4], moments=glob), L.whiten(x[4:], mask[4:], moments=glob)]),
          L.whiten(x, mask), rtol=1e-4, atol=1e-4)
    mean, var_ = L.moments_to_mean_var(*glob)
    close(mean, mu)
    close(var_, var, rtol=1e-4)
    close(L.whiten_with_moments(x, mask, mean, var_), L.whiten(x, mask))
    assert finite_tree(L.whiten(x, np.zeros_like(mask)))


def test_ppo_policy_loss_vs_numpy(rng):
    mask, arr = _tokens(rng)
    logp, old = -np.abs(arr()), -np.abs(arr())
    adv = arr()
    eps = 0.2
    n = mask.sum()
    tot = clip = kl = rsum = 0.0
    B, T = mask.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            lr = float(logp[b, t]) - float(old[b, t])
            rho = np.exp(lr)
            a = float(adv[b, t])
            l1, l2 = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps)
            tot += max(l1, l2)
            clip += float(l2 > l1)
            kl += rho - 1 - lr
            rsum += rho
    loss, m = L.ppo_policy_loss(logp, old, adv, mask, eps)
    close(loss, tot / n, rtol=1e-4)
    close(m["clip_fraction"], clip / n)
    close(m["approx_kl"], kl / n, rtol=1e-4)
    close(m["ratio_mean"], rsum / n, rtol=1e-4)
    # per-sequence advantages broadcast over tokens
    close(L.ppo_policy_loss(logp, old, adv[:, 0], mask)[0],
          L.ppo_policy_loss(logp, old, np.repeat(adv[:, :1], T, 1), mask)[0])
    # edge cases: all masked, garbage under the mask, huge ratios
    z = np.zeros_like(mask)
    assert float(L.ppo_policy_loss(logp, old, adv, z)[0]) == 0.0
    bad = logp.copy()
    bad[mask == 0] = -np.inf
    close(L.ppo_policy_loss(bad, old, adv, mask)[0], loss)
    big = np.where(mask > 0, 1e4, 0.0).astype(np.float32)
    g = jax.grad(lambda x: L.ppo_policy_loss(x, -big, adv, mask)[0])(big)
    assert finite_tree(g) and np.isfinite(float(L.ppo_policy_loss(big, -big, adv, mask)[0]))
    assert finite_tree(jax.grad(lambda x: L.ppo_policy_loss(x, old, adv, mask)[0])(logp))
    assert finite_tree(jax.grad(lambda x: L.ppo_policy_loss(x, old, adv, z)[0])(logp))


def test_ppo_value_loss_and_entropy(rng):
    mask, arr = _tokens(rng)
    v, v_old, g, h = arr(), arr(), arr(), np.abs(arr())
    c = 0.2
    n = mask.sum()
    tot = cf = 0.0
    for b, t in zip(*np.nonzero(mask)):
        vc = min(max(v[b, t], v_old[b, t] - c), v_old[b, t] + c)
        l1, l2 = (v[b, t] - g[b, t]) ** 2, (vc - g[b, t]) ** 2
        tot += 0.5 * max(l1, l2)
        cf += float(l2 > l1)
    loss, m = L.ppo_value_loss(v, v_old, g, mask, c)
    close(loss, tot / n, rtol=1e-4)
    close(m["value_clip_fraction"], cf / n)
    close(m["value_mean"], v[mask > 0].sum() / n, rtol=1e-4)
    assert finite_tree(jax.grad(lambda x: L.ppo_value_loss(x, v_old, g, mask)[0])(v))
    assert float(L.ppo_value_loss(v, v_old, g, np.zeros_like(mask))[0]) == 0.0
    loss, m = L.entropy_bonus(h, mask, 0.01)
    close(m["entropy"], h[mask > 0].sum() / n)
    close(loss, -0.01 * h[mask > 0].sum() / n)


def test_explained_variance(rng):
    mask, arr = _tokens(rng)
    v, g = arr(), arr()
    sel_g, sel_v = g[mask > 0].astype(np.float64), v[mask > 0].astype(np.float64)
    close(L.explained_variance(v, g, mask), 1 - np.var(sel_g - sel_v) / np.var(sel_g), rtol=1e-4)
    close(L.explained_variance(g, g, mask), 1.0)
    close(L.explained_variance(v, g, np.zeros_like(mask)), 0.0)


def test_rloo_and_grpo_advantages(rng):
    Pn, K = 5, 4
    r = rng.normal(size=(Pn, K)).astype(np.float32)
    r[3] = 1.0  # identical group
    rl = np.zeros((Pn, K))
    gr = np.zeros((Pn, K))
    gr_pop = np.zeros((Pn, K))
    for p in range(Pn):
        for i in range(K):
            rl[p, i] = r[p, i] - sum(r[p, j] for j in range(K) if j != i) / (K - 1)
        mu = sum(r[p]) / K
        sd = np.sqrt(sum((r[p, j] - mu) ** 2 for j in range(K)) / (K - 1))
        sd_pop = np.sqrt(sum((r[p, j] - mu) ** 2 for j in range(K)) / K)
        gr[p] = (r[p] - mu) / (sd + 1e-6)
        gr_pop[p] = (r[p] - mu) / (sd_pop + 1e-6)
    close(L.rloo_advantages(r), rl)
    close(L.grpo_advantages(r), gr, rtol=1e-4)
    close(L.grpo_advantages(r, unbiased=False), gr_pop, rtol=1e-4)
    close(L.grpo_advantages(r, scale=False), r - r.mean(-1, keepdims=True))
    assert np.all(np.asarray(L.grpo_advantages(r))[3] == 0)
    close(L.grpo_advantages(r[:, :1]), np.zeros((Pn, 1)))
    with pytest.raises(ValueError):
        L.rloo_advantages(r[:, :1])


def test_reinforce_and_grpo_loss_vs_numpy(rng):
    mask, arr = _tokens(rng)
    logp, old, ref = -np.abs(arr()), -np.abs(arr()), -np.abs(arr())
    adv = arr()[:, 0]
    eps, beta = 0.2, 0.05
    n = mask.sum()
    rein = pg = kl = 0.0
    for b, t in zip(*np.nonzero(mask)):
        lp, o, rf, a = (float(x) for x in (logp[b, t], old[b, t], ref[b, t], adv[b]))
        rein += -a * lp
        rho = np.exp(lp - o)
        pg += max(-a * rho, -a * min(max(rho, 1 - eps), 1 + eps))
        kl += np.exp(rf - lp) - (rf - lp) - 1
    close(L.reinforce_loss(logp, adv, mask)[0], rein / n, rtol=1e-4)
    g = jax.grad(lambda x: L.reinforce_loss(x, adv, mask)[0])(logp)
    close(g, -np.where(mask > 0, adv[:, None], 0.0) / n)
    loss, m = L.grpo_loss(logp, old, ref, adv, mask, eps, beta)
    close(m["policy_loss"], pg / n, rtol=1e-4)
    close(m["kl"], kl / n, rtol=1e-4)
    close(loss, (pg + beta * kl) / n, rtol=1e-4)
    assert finite_tree(jax.grad(lambda x: L.grpo_loss(x, old, ref, adv, mask)[0])(logp))
    z = np.zeros_like(mask)
    assert float(L.grpo_loss(logp, old, ref, adv, z)[0]) == 0.0
    assert finite_tree(jax.grad(lambda x: L.grpo_loss(x, old, ref, adv, z)[0])(logp))
    # sequence-mean form through mask weights (DeepSeekMath eq. 3)
    lens = mask.sum(-1, keepdims=True)
    nseq = float((lens > 0).sum())
    w = np.where(lens > 0, mask / np.maximum(lens, 1), 0.0)
    seq_ref = 0.0
    for b in range(mask.shape[0]):
        if lens[b, 0] == 0:
            continue
        tok = [(max(-adv[b] * np.exp(logp[b, t] - old[b, t]),
                    -adv[b] * np.clip(np.exp(logp[b, t] - old[b, t]), 1 - eps, 1 + eps))
                + beta * (np.exp(ref[b, t] - logp[b, t]) - (ref[b, t] - logp[b, t]) - 1))
               for t in range(mask.shape[1]) if mask[b, t]]
        seq_ref += np.mean(tok)
    close(L.grpo_loss(logp, old, ref, adv, w, eps, beta, num_tokens=nseq)[0], seq_ref / nseq, rtol=1e-4)


def test_adaptive_kl_coef():
    for kl, target in [(6.0, 6.0), (12.0, 6.0), (1.0, 6.0), (6.6, 6.0)]:
        e = np.clip(kl / target - 1, -0.2, 0.2)
        close(L.adaptive_kl_coef(0.1, kl, target, 10000, 256), 0.1 * (1 + e * 256 / 10000))
    assert np.isfinite(float(jax.jit(L.adaptive_kl_coef, static_argnums=(2, 3, 4))(0.2, 3.0, 6.0, 1e4, 64)))


# ============================================================================ log-prob ops
def _lm(rng, B=2, T=10, D=16, V=64):
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    W = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
    y = rng.integers(0, V, size=(B, T)).astype(np.int32)
    return h, W, y


@pytest.mark.parametrize("chunk", [3, 4, 10, 64])
def test_chunked_token_logps_matches_full(rng, chunk):
    h, W, y = _lm(rng)
    full = lambda h, W: L.token_logps(jnp.einsum("btd,dv->btv", h, W), y)
    chunked = lambda h, W: L.chunked_token_logps(h, W, y, chunk_size=chunk)
    close(chunked(h, W), full(h, W), rtol=1e-5, atol=1e-5)
    z = h @ W
    zs = z - z.max(-1, keepdims=True)
    np_lp = np.take_along_axis(zs - np.log(np.exp(zs).sum(-1, keepdims=True)), y[..., None], -1)[..., 0]
    close(full(h, W), np_lp, rtol=1e-5, atol=1e-5)
    wts = rng.normal(size=y.shape).astype(np.float32)
    gf = jax.grad(lambda h, W: jnp.sum(full(h, W) * wts), argnums=(0, 1))(h, W)
    gc = jax.grad(lambda h, W: jnp.sum(chunked(h, W) * wts), argnums=(0, 1))(h, W)
    for a, b in zip(gc, gf):
        close(a, b, rtol=1e-4, atol=1e-5)
    lp, ent = L.chunked_token_logps(h, W, y, chunk_size=chunk, return_entropy=True)
    p = np.exp(zs) / np.exp(zs).sum(-1, keepdims=True)
    close(ent, -(p * np.log(p)).sum(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [4, 64])
def test_chunked_logps_and_entropy_gradients_with_temperature(rng, chunk):
    """The fused chunk's hand-written backward (log-prob and entropy terms, temperature) equals autodiff of
    the dense log-softmax."""
    h, W, y = _lm(rng)
    T = 0.7
    a, b = rng.normal(size=y.shape).astype(np.float32), rng.normal(size=y.shape).astype(np.float32)

    def dense(h, W):
        logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, W) / T, axis=-1)
        lp = jnp.take_along_axis(logp, y[..., None], -1)[..., 0]
        return jnp.sum(a * lp) + jnp.sum(b * -jnp.sum(jnp.exp(logp) * logp, -1))

    def chunked(h, W):
        lp, ent = L.chunked_token_logps(h, W, y, chunk_size=chunk, temperature=T, return_entropy=True)
        return jnp.sum(a * lp) + jnp.sum(b * ent)

    close(chunked(h, W), dense(h, W), rtol=1e-5, atol=1e-4)
    for g, r in zip(jax.grad(chunked, argnums=(0, 1))(h, W), jax.grad(dense, argnums=(0, 1))(h, W)):
        close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (4, 2)])
def test_vocab_sharded_logps_equal_unsharded(rng, shape):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "tensor"))
    h, W, y = _lm(rng, B=4, T=6, D=16, V=64)
    logits = np.einsum("btd,dv->btv", h, W)
    ref_lp = L.token_logps(logits, y)
    ref_chunk = L.chunked_token_logps(h, W, y, chunk_size=4)
    wts = rng.normal(size=y.shape).astype(np.float32)
    ref_g = jax.grad(lambda h, W: jnp.sum(L.chunked_token_logps(h, W, y, chunk_size=4) * wts), argnums=(0, 1))(h, W)

    s_logits = jax.device_put(logits, NamedSharding(mesh, P("data", None, "tensor")))
    s_h = jax.device_put(h, NamedSharding(mesh, P("data", None, None)))
    s_W = jax.device_put(W, NamedSharding(mesh, P(None, "tensor")))
    s_y = jax.device_put(y, NamedSharding(mesh, P("data", None)))
    lp = jax.jit(L.token_logps)(s_logits, s_y)
    close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    f = jax.jit(lambda h, W, y: L.chunked_token_logps(h, W, y, chunk_size=4))
    close(f(s_h, s_W, s_y), ref_chunk, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda h, W, y: jnp.sum(L.chunked_token_logps(h, W, y, chunk_size=4) * wts),
                         argnums=(0, 1)))(s_h, s_W, s_y)
    for a, b in zip(g, ref_g):
        close(a, b, rtol=1e-4, atol=1e-5)
    # the vocabulary-sharded unembedding keeps its sharding through the gradient
    assert g[1].sharding.is_equivalent_to(s_W.sharding, 2)
    # the vocabulary is never gathered: only [B, T]-shaped partial results cross devices
    hlo = jax.jit(L.token_logps).lower(s_logits, s_y).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_sequence_logps_and_masked_mean(rng):
    mask, arr = _tokens(rng)
    lp = arr()
    close(L.sequence_logps(lp, mask), (lp * mask).sum(-1))
    lens = mask.sum(-1)
    close(L.sequence_logps(lp, mask, average=True), np.where(lens > 0, (lp * mask).sum(-1) / np.maximum(lens, 1), 0))
    close(L.masked_mean(lp, mask), (lp * mask).sum() / mask.sum())
    close(L.masked_mean(lp, np.zeros_like(mask)), 0.0)


def test_advantages_of_equal_rewards_are_exactly_zero():
    # f32 means of K equal values are often an ulp off (5.3 x 8); GRPO divided that by std + 1e-6 and
    # gave 0.316 to every sample of an all-correct group. Every estimator must give exactly 0.
    values = np.concatenate([[5.3, 0.1, -3.7, 1e6, 1.0, 0.0, -1e-3],
                             np.random.default_rng(1).normal(size=60) * 10]).astype(np.float32)
    for K in (2, 3, 4, 8, 16, 64):
        r = np.repeat(values[:, None], K, axis=1)
        for scale in (True, False):
            for unbiased in (True, False):
                out = np.asarray(L.grpo_advantages(r, scale=scale, unbiased=unbiased))
                assert np.all(out == 0), (K, scale, unbiased, out[np.any(out != 0, -1)][:2])
        assert np.all(np.asarray(L.rloo_advantages(r)) == 0), K
    assert np.all(np.asarray(L.grpo_advantages(np.full((1, 8), 5.3, np.float32))) == 0)
    # mixed groups: the equal ones are still exactly 0, the others match float64
    r = np.random.default_rng(2).normal(size=(6, 8)).astype(np.float32) * 3
    r[[1, 4]] = np.float32(5.3)
    r64 = r.astype(np.float64)
    c = r64 - r64.mean(-1, keepdims=True)
    expect = c / (np.sqrt((c * c).sum(-1, keepdims=True) / 7) + 1e-6)
    out = np.asarray(L.grpo_advantages(r))
    assert np.all(out[[1, 4]] == 0)
    close(out, expect, rtol=1e-5, atol=1e-5)
    close(L.rloo_advantages(r), r64 - (r64.sum(-1, keepdims=True) - r64) / 7, rtol=1e-5, atol=1e-5)


def test_whiten_of_constant_data_is_exactly_zero():
    mask = np.ones((4, 16), np.float32)
    mask[1, 9:] = 0
    mask[3, :5] = 0
    for v in (5.3, 0.1, -3.7, 1e4, 6.404226):
        x = np.full((4, 16), v, np.float32)
        assert np.all(np.asarray(L.whiten(x, mask)) == 0), v
        out = np.asarray(L.whiten(x, mask, shift_mean=False))
        assert np.all(out[mask > 0] == np.float32(v)) and np.all(out[mask == 0] == 0), v
        # global moments taken around a shared shift (as across processes)
        s = np.float32(v)
        m1, m2 = L.masked_moments(x[:2], mask[:2], s), L.masked_moments(x[2:], mask[2:], s)
        glob = tuple(a + b for a, b in zip(m1, m2))
        assert np.all(np.asarray(L.whiten(x[:2], mask[:2], moments=glob, shift=s)) == 0), v
    # a large offset (one-pass variance around 0 would cancel) against float64
    rng = np.random.default_rng(3)
    x = (1000.0 + rng.normal(size=(4, 16)) * 0.01).astype(np.float32)
    sel = x[mask > 0].astype(np.float64)
    expect = np.where(mask > 0, (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8), 0.0)
    close(L.whiten(x, mask), expect, rtol=1e-4, atol=1e-4)  # one-pass around 0: off by 2.96
