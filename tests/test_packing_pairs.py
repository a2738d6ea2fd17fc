"""Packing of two-sided rows (preference pairs): every pair whole and apart, no attention across the packed
sequences, the packed iterator covers an epoch and resumes exactly. (Packed == unpacked train steps of DPO,
SimPO, the reward models and KTO, through the algorithms themselves: tests/test_packing_train.py.)

The reference is the unpacked path (one pair per [2, T] row); the packed batch holds the same pairs, several
per row, with segment ids 2k+1 / 2k+2.
"""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.algorithms.dpo import pair_sequence_logps
from jalign.algorithms.packed_pairs import pair_view
from jalign.config import ModelConfig
from jalign.data.packing import pack_pairs, padding_fraction
from jalign.data.preference import pair_row
from jalign.models.params import init_params
from jalign.models.transformer import declare_params

CFG = ModelConfig(vocab_size=64, hidden=32, mlp=64, layers=2, heads=4, kv_heads=2, max_seq_len=128)
T_PAIR, T_PACKED, MAX_PAIRS = 24, 64, 3


def pair_records(n, seed=0):
    """``n`` pairs with a shared prompt and responses of different lengths (loss on the response only)."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        p = int(rng.integers(2, 8))
        rec = {"index": i, "chosen_reward": float(rng.normal()), "rejected_reward": float(rng.normal())}
        prompt = rng.integers(3, CFG.vocab_size, p)
        for side in ("chosen", "rejected"):
            r = int(rng.integers(2, T_PAIR - p))
            ids = np.concatenate([prompt, rng.integers(3, CFG.vocab_size, r)]).astype(np.int32)
            rec[side] = (ids, np.asarray([0] * p + [1] * r, np.int32))
        recs.append(rec)
    return recs


def batches(mode, n=10):
    rows = [pair_row(r, T_PAIR, mode) for r in pair_records(n)]
    unpacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    ds = grain.MapDataset.source(rows).to_iter_dataset()
    packed_rows = list(pack_pairs(ds, T_PACKED, num_bins=2, max_pairs=MAX_PAIRS, example_row=rows[0]))
    packed = {k: np.stack([r[k] for r in packed_rows]) for k in packed_rows[0]}
    return unpacked, packed


def test_pack_pairs_keeps_every_pair_whole_and_apart():
    unpacked, packed = batches("lm")
    R = packed["tokens"].shape[0]
    assert R < len(unpacked["index"])  # several pairs share a row
    assert padding_fraction(packed["segment_ids"]) < padding_fraction(unpacked["segment_ids"])
    seen = set()
    for r in range(R):
        for k in range(MAX_PAIRS):
            if packed["valid"][r, k] == 0:
                assert not np.any(np.isin(packed["segment_ids"][r], [2 * k + 1, 2 * k + 2]))
                continue
            i = int(packed["index"][r, k])
            seen.add(i)
            np.testing.assert_array_equal(packed["rewards"][r, k], unpacked["rewards"][i])
            for side in (0, 1):
                sel = packed["segment_ids"][r] == 2 * k + 1 + side
                n = int(np.sum(unpacked["segment_ids"][i, side] > 0))
                assert sel.sum() == n
                for f in ("tokens", "targets", "loss_mask"):
                    np.testing.assert_array_equal(packed[f][r][sel], unpacked[f][i, side, :n])
                np.testing.assert_array_equal(packed["positions"][r][sel], np.arange(n))  # restart per side
    assert seen == set(range(len(unpacked["index"])))


def test_a_pair_longer_than_the_packed_row_is_named():
    rows = [pair_row(r, T_PAIR, "lm") for r in pair_records(2)]
    ds = grain.MapDataset.source(rows).to_iter_dataset()
    with pytest.raises(ValueError, match="index 0.*packed row of 8"):
        list(pack_pairs(ds, 8, num_bins=1, max_pairs=2, example_row=rows[0]))


def test_no_attention_across_packed_sequences():
    """Changing every token of one packed sequence leaves every other sequence's log-probs as they were."""
    _, packed = batches("lm")
    params = init_params(declare_params(CFG), jax.random.key(0))
    seg = packed["segment_ids"][0]
    changed = dict(packed)
    changed["tokens"] = packed["tokens"].copy()
    victim = seg == 2  # the rejected side of the row's first pair (its chosen side comes before it)
    changed["tokens"][0][victim] = (packed["tokens"][0][victim] + 7) % CFG.vocab_size

    def token_logps(b):
        view = pair_view(jax.tree.map(jnp.asarray, b))
        from jalign.algorithms.base import policy_token_logps

        return np.asarray(policy_token_logps(params, view["rows"], CFG))[0]

    before, after = token_logps(packed), token_logps(changed)
    others = (seg > 0) & ~victim
    np.testing.assert_allclose(after[others], before[others], rtol=0, atol=1e-6)
    assert np.max(np.abs(after[victim] - before[victim])) > 1e-3  # the perturbed sequence did change
    # and the pair's sums through the packed view move only for that pair
    s0, _, _ = pair_sequence_logps(params, pair_view(jax.tree.map(jnp.asarray, packed)), CFG)
    s1, _, _ = pair_sequence_logps(params, pair_view(jax.tree.map(jnp.asarray, changed)), CFG)
    diff = np.abs(np.asarray(s1) - np.asarray(s0))
    assert diff[0, 1] > 1e-3 and diff[0, 0] < 1e-5 and np.all(diff[1:] < 1e-5)


def test_packed_pair_iterator_covers_the_epoch_and_resumes_exactly():
    from jalign.data.pipeline import make_packed_pair_iterator

    recs = pair_records(12, seed=4)

    def make(**kw):
        return make_packed_pair_iterator(recs, lambda r: pair_row(r, T_PAIR, "lm"), seq_len=T_PACKED,
                                         batch_rows_per_process=2, max_pairs=MAX_PAIRS, shuffle=True, seed=3, **kw)

    seen = []
    for b in make(repeat=False):
        assert b["tokens"].shape == (2, T_PACKED) and b["valid"].shape == (2, MAX_PAIRS)
        seen += [int(i) for i, v in zip(b["index"].ravel(), b["valid"].ravel()) if v > 0]
    assert len(seen) == len(set(seen)) and len(seen) >= 12 - 2 * MAX_PAIRS  # the last partial batch is dropped
    it = make()
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = make()
    again.set_state(state)
    for w in want:
        got = next(again)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
