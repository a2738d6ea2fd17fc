"""Reward-hacking and stability monitors: the alarm fires when the optimised reward rises while the gold one
falls and not when both rise; correlations, trends, KL/length/repetition/truncation/entropy summaries
against direct computations; the tracker's state round-trips."""
import json

import numpy as np
import pytest

from jalign import monitors as M


def test_pearson_spearman_trend():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    np.testing.assert_allclose(M.pearson(x, y), np.corrcoef(x, y)[0, 1], rtol=1e-12)
    np.testing.assert_allclose(M.pearson(x, 2 * x + 1), 1.0)
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0 and M.pearson([1], [2]) == 0.0
    assert M.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert M.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties
    t = np.arange(10)
    assert M.trend(3.0 * t + 2) == pytest.approx(3.0)
    assert M.trend([5.0]) == 0.0
    np.testing.assert_allclose(M.trend(y[:7]), np.polyfit(np.arange(7), y[:7], 1)[0], rtol=1e-10)
    with pytest.raises(ValueError, match="equal length"):
        M.pearson([1, 2], [1, 2, 3])


def _series(n=12, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    return t, rng.normal(scale=0.01, size=n), rng.normal(scale=0.01, size=n)


def test_alarm_fires_when_reward_rises_and_gold_falls():
    t, e1, e2 = _series()
    reward = 0.1 * t + e1                     # the proxy keeps rising
    gold = np.where(t < 6, 0.05 * t, 0.3 - 0.08 * (t - 6)) + e2   # gold peaks at evaluation 6, then falls
    fired = [M.hacking_alarm(reward[:i + 1], gold[:i + 1], window=4, min_reward_rise=0.05, min_gold_drop=0.05)
             for i in range(len(t))]
    assert not any(fired[:7]) and all(fired[9:]), fired
    # both rising: never; reward flat while gold falls: never; reward falls, gold falls: never
    both = [M.hacking_alarm(reward[:i + 1], 0.05 * t[:i + 1] + e2[:i + 1], window=4, min_reward_rise=0.05,
                            min_gold_drop=0.05) for i in range(len(t))]
    assert not any(both)
    assert not M.hacking_alarm(e1, -0.1 * t + e2, window=4, min_reward_rise=0.05, min_gold_drop=0.05)
    assert not M.hacking_alarm(-0.1 * t, -0.1 * t, window=4)
    assert not M.hacking_alarm([0.0, 1.0], [1.0, 0.0], window=4)  # too few points
    with pytest.raises(ValueError, match="window"):
        M.hacking_alarm(reward, gold, window=1)


def test_tracker_alarm_correlation_and_state():
    t, e1, e2 = _series()
    reward = 0.1 * t + e1
    gold = np.where(t < 6, 0.05 * t, 0.3 - 0.08 * (t - 6)) + e2
    mon = M.HackingMonitor(window=4, min_reward_rise=0.05, min_gold_drop=0.05)
    outs = []
    for i in range(8):
        outs.append(mon.update(100 * i, reward=reward[i], gold=gold[i], entropy=2.0 - 0.2 * i, length=10 + i,
                               kl=0.01 * i))
    # resume from a JSON round trip, then continue: same result as uninterrupted
    resumed = M.HackingMonitor.from_state_dict(json.loads(json.dumps(mon.state_dict())))
    straight = M.HackingMonitor.from_state_dict(json.loads(json.dumps(mon.state_dict())))
    for i in range(8, 12):
        outs.append(resumed.update(100 * i, reward=reward[i], gold=gold[i], entropy=2.0 - 0.19 * i,
                                   length=10 + i, kl=0.01 * i))
        straight.update(100 * i, reward=reward[i], gold=gold[i], entropy=2.0 - 0.19 * i, length=10 + i, kl=0.01 * i)
    assert resumed.state_dict() == straight.state_dict()
    alarms = [o["hacking_alarm"] for o in outs]
    assert alarms[:7] == [0.0] * 7 and alarms[-1] == 1.0
    first = outs[-1]["first_alarm_step"]
    assert first == 100 * alarms.index(1.0)
    np.testing.assert_allclose(outs[-1]["reward_gold_corr"], np.corrcoef(reward, gold)[0, 1], rtol=1e-9)
    np.testing.assert_allclose(outs[5]["reward_gold_corr"], np.corrcoef(reward[:6], gold[:6])[0, 1], rtol=1e-9)
    assert outs[0]["entropy_collapse"] == 0.0 and outs[-1]["entropy_collapse"] == 1.0  # 2.0 -> 0.09 < 0.4
    np.testing.assert_allclose(outs[-1]["entropy_ratio"], (2.0 - 0.19 * 11) / 2.0)
    np.testing.assert_allclose(outs[-1]["length_ratio"], 21 / 10)
    assert outs[-1]["kl"] == pytest.approx(0.11)
    assert mon.update(0, kl=1.0) == {"kl": 1.0}  # missing signals are skipped
    with pytest.raises(ValueError, match="unknown keys"):
        M.HackingMonitor.from_state_dict({"windw": 3})


def test_batch_summaries():
    kl = np.array([[0.1, 0.2, 9.0], [0.3, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    s = M.kl_summary(kl, mask)
    assert s["kl_per_token"] == pytest.approx(0.6 / 3)
    assert s["kl_per_seq_mean"] == pytest.approx((0.3 + 0.3) / 2) and s["kl_per_seq_max"] == pytest.approx(0.3)
    assert M.kl_summary(kl, np.zeros_like(mask)) == {"kl_per_token": 0.0, "kl_per_seq_mean": 0.0,
                                                     "kl_per_seq_max": 0.0}
    d = M.length_drift([10, 20, 30], 10.0)
    assert d == {"length_mean": 20.0, "length_drift": 10.0, "length_ratio": 2.0}
    assert M.repetition_rate(["abcabcabc"], n=3) == pytest.approx(1 - 3 / 7)
    assert M.repetition_rate([[1, 2, 3, 4, 5]], n=2) == 0.0
    assert M.repetition_rate([[7] * 50], n=3) == pytest.approx(1 - 1 / 48)
    assert M.repetition_rate([[1, 2]], n=3) == 0.0 and M.repetition_rate([], n=3) == 0.0
    text = "the cat sat on the mat and then the dog ran off".split()
    loop = ("the the the " * 10).split()
    assert M.repetition_rate([text], n=2) < 0.1 < 0.9 < M.repetition_rate([loop], n=2)
    assert M.truncated_fraction([True, False, True, True]) == 0.25 and M.truncated_fraction([]) == 0.0
    assert M.entropy_collapsed([2.0, 1.0, 0.3]) and not M.entropy_collapsed([2.0, 1.0, 0.5])
    assert M.entropy_collapsed([0.3], baseline=2.0) and not M.entropy_collapsed([])
    b = M.batch_monitors([[1, 2, 3], [4, 4, 4, 4, 4]], [True, False], kl=kl[:2], mask=mask[:2],
                         entropy=np.ones((2, 3)), baseline_length=2.0, ngram=2)
    assert b["length_mean"] == 4.0 and b["length_ratio"] == 2.0 and b["truncated_fraction"] == 0.5
    assert b["repetition_rate"] == pytest.approx((0 + (1 - 1 / 4)) / 2) and b["entropy"] == 1.0
    assert b["kl_per_token"] == pytest.approx(0.2)
