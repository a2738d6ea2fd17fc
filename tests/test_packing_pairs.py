"""Packing of two-sided rows (preference pairs): packed == unpacked losses and gradients for DPO and the
pairwise reward model, and no attention across the packed sequences.

The reference is the unpacked path (one pair per [2, T] row, the code every pair algorithm ran before);
the packed batch holds the same pairs, several per row, with segment ids 2k+1 / 2k+2.
"""
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.algorithms.dpo import DPO, DPOConfig, pair_sequence_logps
from jalign.algorithms.packed_pairs import is_packed, pair_view
from jalign.algorithms.reward import RewardConfig, RewardModel
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


def fake_algorithm(cls, a):
    """The algorithm's loss methods on a bare instance (no run, no data): the math under test, nothing else."""
    algo = object.__new__(cls)
    algo.a, algo.cfg = a, types.SimpleNamespace(model=CFG)
    algo.reference_free, algo.precomputed, algo.pairwise = False, False, True
    algo.trainable = types.SimpleNamespace(reference=lambda roles: roles["reference"])
    return algo


def loss_and_grads(algo, params, batch, roles):
    batch = jax.tree.map(jnp.asarray, batch)
    norms = algo.normalizers(batch)
    (loss, m), g = jax.value_and_grad(lambda p: algo.loss(p, batch, norms, roles), has_aux=True)(params)
    return loss, m, g, norms


def assert_trees_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_dpo_packed_equals_unpacked(sft_weight):
    unpacked, packed = batches("lm")
    assert is_packed(packed) and not is_packed(unpacked)
    params = init_params(declare_params(CFG), jax.random.key(0))
    ref = init_params(declare_params(CFG), jax.random.key(1))
    algo = fake_algorithm(DPO, DPOConfig(beta=0.1, sft_weight=sft_weight))
    lu, mu, gu, nu = loss_and_grads(algo, params, unpacked, {"reference": ref})
    lp, mp, gp, np_ = loss_and_grads(algo, params, packed, {"reference": ref})
    assert float(nu["num_pairs"]) == float(np_["num_pairs"]) == len(unpacked["index"])
    np.testing.assert_allclose(float(nu["num_chosen_tokens"]), float(np_["num_chosen_tokens"]))
    np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)
    for k in ("num_tokens", "sft_loss", "accuracy", "policy_accuracy"):
        if k in mu:
            np.testing.assert_allclose(float(mp[k]), float(mu[k]), rtol=1e-5, atol=1e-6)
    assert_trees_close(gp, gu, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(gu)) > 0  # the gradient is not trivially 0


def test_reward_model_packed_equals_unpacked():
    unpacked, packed = batches("score")
    params = init_params(declare_params(CFG, lm_head=False, score_outputs=1), jax.random.key(2))
    # a random score head (a fresh one may be zero-initialised)
    params["score"] = jax.random.normal(jax.random.key(3), params["score"].shape) * 0.5
    algo = fake_algorithm(RewardModel, RewardConfig())
    lu, mu, gu, _ = loss_and_grads(algo, params, unpacked, {})
    lp, mp, gp, _ = loss_and_grads(algo, params, packed, {})
    np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)
    np.testing.assert_allclose(float(mp["num_tokens"]), float(mu["num_tokens"]))
    assert_trees_close(gp, gu, rtol=1e-4, atol=1e-6)


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


def test_kto_packed_equals_unpacked():
    """KTO rows (the completion + its mismatched KL row) packed like pairs: same loss, KL point and gradients."""
    from jalign.algorithms.kto import KTO, KTOConfig
    from jalign.data.unpaired import unpaired_row

    recs = []
    for i, r in enumerate(pair_records(9, seed=5)):
        recs.append({"completion": r["chosen"], "kl": r["rejected"], "label": float(i % 3 != 0),
                     "kl_valid": float(i != 4), "index": i})
    rows = [unpaired_row(r, T_PAIR) for r in recs]
    unpacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    ds = grain.MapDataset.source(rows).to_iter_dataset()
    packed_rows = list(pack_pairs(ds, T_PACKED, num_bins=2, max_pairs=MAX_PAIRS, example_row=rows[0]))
    packed = {k: np.stack([r[k] for r in packed_rows]) for k in packed_rows[0]}
    assert packed["tokens"].shape[0] < len(rows)
    params = init_params(declare_params(CFG), jax.random.key(0))
    ref = init_params(declare_params(CFG), jax.random.key(1))
    algo = fake_algorithm(KTO, KTOConfig(beta=0.2, desirable_weight=1.0, undesirable_weight=1.5))
    roles = {"reference": ref}
    out = []
    for b in (unpacked, packed):
        b = jax.tree.map(jnp.asarray, b)
        norms = dict(algo.normalizers(b), **algo.batch_statistics()(params, roles, jax.tree.map(lambda x: x[None], b)))
        (loss, m), g = jax.value_and_grad(lambda p: algo.loss(p, b, norms, roles), has_aux=True)(params)
        out.append((loss, m, g, norms))
    (lu, mu, gu, nu), (lp, mp, gp, np_) = out
    for k in ("num_seqs", "num_kl"):
        assert float(nu[k]) == float(np_[k])
    np.testing.assert_allclose(float(np_["kto_kl"]), float(nu["kto_kl"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)
    np.testing.assert_allclose(float(mp["num_tokens"]), float(mu["num_tokens"]))
    assert_trees_close(gp, gu, rtol=1e-4, atol=1e-6)
