"""Training on packed pairs (``data.pack_pairs``): two jitted train steps of DPO (packed: its reference
precomputed, joined per pair slot), SimPO (reference-free), the pairwise and the attribute-regression reward
models and KTO (under LoRA: the reference is the base with the adapters off) on packed rows, on a data x sequence mesh (ring attention) with
gradient accumulation, equal the steps on the same pairs unpacked on one device (loss, metrics, updated params);
packed eval equals unpacked eval; a packed DPO run resumed equals the uninterrupted run; the config errors where
packing cannot apply.

The reference is the unpacked path: the same algorithm and config with ``data.pack_pairs`` off, one pair per
[2, T] row. Both start from the same weights (``model.init_from: null``, same seed).
"""
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from jalign.algorithms import base
from jalign.algorithms.registry import resolve
from jalign.config import ConfigError, load_config, packed_pair_len
from jalign.data.packing import empty_like, pack_pairs
from jalign.evaluation import reduce_eval
from jalign.metrics import read_metrics
from jalign.trainer import train
from sharding import make_mesh, make_rules, use_rules
from helpers import roles_for

ROOT = Path(__file__).parent.parent
TINY = [
    "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4", "model.kv_heads=2", "model.init_from=null",
    "data.seq_len=40", "data.pack_max_pairs=4", "train.log_every=1", "train.progress=false",
    "train.tensorboard=false", "train.async_checkpointing=false", "eval.prompts=0", "eval.at_start=false",
    "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", "optim.eps=1e-4", "optim.weight_decay=0.1",
]
PAIRS = ["data.train=builtin:addition_pairs:train:64", "data.eval=builtin:addition_pairs:eval:12"]
UNPAIRED = ["data.train=builtin:addition_unpaired:train:64", "data.eval=builtin:addition_unpaired:eval:12"]
LORA = ["model.lora.rank=4", "model.lora.alpha=8"]
CASES = {  # config, overrides of both runs
    "dpo": ("configs/dpo_tiny.yaml", PAIRS + ["algorithm.sft_weight=0.5"]),
    "simpo": ("configs/dpo_tiny.yaml", PAIRS + ["algorithm.loss=simpo", "algorithm.sft_weight=0.3"]),  # no reference
    "reward": ("configs/rm_tiny.yaml", PAIRS),
    "kto_lora": ("configs/kto_tiny.yaml", UNPAIRED + LORA + ["algorithm.undesirable_weight=1.5"]),  # ref: the base
    "regression": ("configs/rm_tiny.yaml", ["data.train=builtin:addition_steer_rm:train:64",  # one-sided rows
                                            "data.eval=builtin:addition_steer_rm:eval:12", "algorithm.loss=regression",
                                            "algorithm.num_attributes=2"]),
}
# the packed run only: DPO's reference log-probs precomputed (stored per pair, joined per pair slot) against the
# unpacked run's live reference
PACKED_ONLY = {"dpo": ["algorithm.reference=precomputed"]}
# the packed run's mesh: DPO's on data 2 x sequence 2 (ring attention over the packed rows), the others on one
# device (the compile of a sharded step costs more CI time than it adds here)
PACKED_MESH = {"dpo": (2, 1, 1, 2)}
N_PAIRS = 10  # pairs in the compared optimizer batch


def make_algo(tmp_path, case, *extra, shape=(1, 1, 1, 1)):
    path, overrides = CASES[case]
    cfg = load_config(ROOT / path, TINY + overrides + [f"train.out_dir={tmp_path}", *extra])
    mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(tmp_path), log=lambda *a: None)
    with use_rules(mesh, rt.rules):
        return resolve(cfg.algorithm.name)(rt)


def assert_params_close(actual, expected, rtol=1e-4, floor=1e-2):
    """Each tensor within rtol of the expected tensor's scale (max |x|, at least ``floor``: a tensor whose update
    is 0 exactly in one layout, e.g. a reward model's score bias, which the Bradley-Terry loss cannot see, gets
    float noise of ~1e-7 in the other)."""
    def check(a, b):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= rtol * max(np.abs(b).max(), floor), (np.abs(a - b).max(), np.abs(b).max())

    jax.tree.map(check, actual, expected)


def stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def same_pairs(algo, n, rows_multiple):
    """The first ``n`` training records one pair per row, and packed (first fit, ``data.pack_max_pairs``), padded
    with empty packed rows to a multiple of ``rows_multiple``."""
    recs = algo.data.train_records[:n]
    rows = [algo.data.make_row(r) for r in recs]
    d = algo.cfg.data
    ds = grain.MapDataset.source(rows).to_iter_dataset()
    packed = list(pack_pairs(ds, packed_pair_len(d), 2, d.pack_max_pairs, rows[0]))
    packed += [empty_like(packed[0])] * (-len(packed) % rows_multiple)
    return stack(rows), stack(packed)


def steps(algo, batch, n=2):
    """``n`` train steps on the same batch: step 1 with policy == reference, step 2 from the updated policy."""
    with use_rules(algo.rt.mesh, algo.rt.rules):
        roles = roles_for(algo)
        state = algo.init_state(roles)
        algo.start(state, roles)
        metrics = []
        for _ in range(n):
            state, m = algo.step(state, roles, batch)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
        return metrics, jax.device_get(state.params), state, roles


COMPARED = ("loss", "preference_loss", "sft_loss", "accuracy", "policy_accuracy", "margin_mean", "rewards_chosen_mean",
            "reward_chosen_mean", "reward_rejected_mean", "reward_std", "kl", "rewards_desirable", "num_tokens",
            "num_pairs", "num_seqs", "mae", "mae_attr_0", "mae_attr_1", "num_values")


@pytest.mark.parametrize("case", list(CASES))
def test_packed_train_step_equals_unpacked(tmp_path, case):
    unpacked_algo = make_algo(tmp_path / "u", case, f"train.global_batch={N_PAIRS}")
    unpacked, packed = same_pairs(unpacked_algo, N_PAIRS, 4)
    R = packed["tokens"].shape[0]
    assert R < N_PAIRS and packed["valid"].sum() == N_PAIRS  # several pairs per row, every pair once
    # packed: 2 accumulation steps (the normalisers count pairs over the whole optimizer batch)
    packed_algo = make_algo(tmp_path / "p", case, "data.pack_pairs=true", f"train.global_batch={R}",
                            f"train.micro_batch={R // 2}", *PACKED_ONLY.get(case, []),
                            shape=PACKED_MESH.get(case, (1, 1, 1, 1)))
    assert packed_algo.fields["tokens"] == ("batch", "seq") and packed_algo.fields["valid"] == ("batch", None)
    mu, pu, _, _ = steps(unpacked_algo, unpacked)
    mp, pp, _, _ = steps(packed_algo, packed)
    if case == "dpo":
        assert (tmp_path / "p" / "reference_logps" / "done.json").exists() and mu[1]["margin_mean"] != 0
    for s in range(2):
        for k in COMPARED:
            # step 1 of DPO: policy == reference, every margin 0 exactly when both come from the same layout;
            # the precomputed reference (unpacked layout) leaves float noise around 0, which decides ties
            tie = case == "dpo" and s == 0 and k in ("accuracy", "policy_accuracy")
            if k in mu[s] and not tie:
                np.testing.assert_allclose(mp[s][k], mu[s][k], rtol=2e-5, atol=1e-6, err_msg=f"step {s + 1}: {k}")
        np.testing.assert_allclose(mp[s]["grad_norm"], mu[s]["grad_norm"], rtol=1e-4)
    assert mu[0]["skipped"] == mp[0]["skipped"] == 0 and mu[0]["grad_norm"] > 0
    assert_params_close(pp, pu)  # the updated params after two steps


def test_packed_eval_equals_unpacked_and_covers_every_pair(tmp_path):
    u = make_algo(tmp_path / "u", "dpo", "train.global_batch=4")
    p = make_algo(tmp_path / "p", "dpo", "data.pack_pairs=true", "train.global_batch=2")
    batches = list(p.eval_batches())
    seen = [int(i) for b in batches for i, v in zip(b["index"].ravel(), b["valid"].ravel()) if v > 0]
    assert sorted(seen) == list(range(len(p.data.eval_records))) and len(batches) < len(list(u.eval_batches()))
    out = []
    for algo in (u, p):
        with use_rules(algo.rt.mesh, algo.rt.rules):
            roles = roles_for(algo)
            state = algo.init_state(roles)
            out.append(reduce_eval(algo, state, roles, 0))
    for k, v in out[0].items():
        np.testing.assert_allclose(out[1][k], v, rtol=2e-5, atol=1e-6, err_msg=k)


def run_cfg(out_dir, *extra):
    path, overrides = CASES["dpo"]
    return load_config(ROOT / path, TINY + overrides + [
        "data.pack_pairs=true", "train.global_batch=8", "mesh.data=8", "train.steps=4",
        "train.checkpoint_every=2",
        "train.eval_every=0", f"train.out_dir={out_dir}", *extra])


def test_packed_dpo_run_resumed_equals_uninterrupted(tmp_path):
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    train(run_cfg(straight))
    assert train(run_cfg(sliced, "train.stop_after_steps=2"))["step"] == 2
    assert train(run_cfg(sliced))["step"] == 4
    rows = {d: {r["step"]: r for r in read_metrics(d) if "loss" in r} for d in (straight, sliced)}
    assert sorted(rows[straight]) == sorted(rows[sliced]) == [1, 2, 3, 4]
    for s in range(1, 5):  # bitwise on CPU: the same packed batches in the same order
        assert rows[sliced][s]["loss"] == rows[straight][s]["loss"]
        assert rows[sliced][s]["num_pairs"] == rows[straight][s]["num_pairs"] > 8  # more pairs than rows
    from jalign.checkpoint import load_params

    jax.tree.map(np.testing.assert_array_equal, jax.device_get(load_params(sliced)),
                 jax.device_get(load_params(straight)))


@pytest.mark.parametrize("config, extra, match", [
    ("configs/sft_tiny.yaml", [], r"data.pack_pairs=true but algorithm.name=sft does not take packed pair rows"),
])
def test_algorithms_that_cannot_take_packed_rows_say_so(tmp_path, config, extra, match):
    cfg = load_config(ROOT / config, TINY + ["data.pack_pairs=true", f"train.out_dir={tmp_path}", *extra])
    mesh = make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(tmp_path), log=lambda *a: None)
    with pytest.raises(ConfigError, match=match):
        resolve(cfg.algorithm.name)(rt)


@pytest.mark.parametrize("extra, match", [
    (["data.pack_max_pairs=0"], r"data.pack_max_pairs: must be >= 1"),
    (["model.max_seq_len=64"], r"data.pack_pairs: packed pair rows are 2 \* data.seq_len = 80 tokens, more than "
                               r"model.max_seq_len=64"),
])
def test_bad_packing_keys_are_named(tmp_path, extra, match):
    path, overrides = CASES["dpo"]
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / path, TINY + overrides + ["data.pack_pairs=true", *extra])


def test_plan_sizes_the_packed_rows(tmp_path):
    """``jalign plan`` (abstract mode) builds the packed run's programs: the reference pass over unpacked pairs,
    then the train and eval steps over packed rows [accum, rows, 2 * seq_len] and per-pair tables [.., K, ...]."""
    cfg = load_config(ROOT / "configs/dpo_tiny.yaml", TINY + PAIRS + [
        "data.pack_pairs=true", "algorithm.reference=precomputed", "train.global_batch=4", "train.micro_batch=2",
        "model.tokenizer=byte", "model.vocab_size=384", f"train.out_dir={tmp_path}"])
    mesh = make_mesh(2, 1, 1, 1, devices=jax.devices()[:2])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(tmp_path), log=lambda *a: None,
                      abstract=True)
    with use_rules(mesh, rt.rules):
        progs = resolve("dpo")(rt).programs()
        assert list(progs)[:2] == ["reference_logps", "train_step"]
        ref_batch = progs["reference_logps"].args[1]
        assert ref_batch["tokens"].shape == (1, 4, 2, 40) and ref_batch["valid"].shape == (1, 4)
        batch = progs["train_step"].args[2]
        assert batch["tokens"].shape == (2, 2, 80) and batch["valid"].shape == (2, 2, 4)
        assert batch["ref_logps"].shape == batch["rewards"].shape == (2, 2, 4, 2)
        assert progs["eval_step"].args[2]["tokens"].shape == (1, 4, 80)
        for name in ("reference_logps", "train_step", "eval_step"):
            progs[name].fn.lower(*progs[name].args)  # traces: the shapes fit the algorithm's programs
