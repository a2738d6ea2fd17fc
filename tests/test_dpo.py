"""DPO: policy == reference gives log 2, precomputed == live reference, sharded == unsharded,
accumulation == big batch, the reference never changes, over-long pairs, and the loop end to end."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign.algorithms import base
from jalign.algorithms.dpo import DPO
from jalign.config import load_config
from jalign.data.formats import PreferenceExample
from jalign.data.preference import fit_responses, tokenize_pairs
from jalign.data.tokenizer import load_tokenizer
from jalign.metrics import read_metrics
from jalign.trainer import train
from sharding import make_mesh, make_rules, use_rules
from helpers import assert_trees_close, roles_for

ROOT = Path(__file__).parent.parent
TINY = [
    "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4", "model.kv_heads=2", "model.init_from=null",
    "data.train=builtin:addition_pairs:train:64", "data.eval=builtin:addition_pairs:eval:16", "data.seq_len=16",
    "train.global_batch=8", "train.steps=10", "train.eval_batches=2", "train.log_every=1", "train.progress=false",
    "train.tensorboard=false", "train.async_checkpointing=false", "eval.prompts=4",
    "eval.max_new_tokens=4", "algorithm.sft_weight=0.5", "algorithm.length_normalize=true",
    # eps well above float32 gradient noise (see tests/test_train_step.py)
    "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", "optim.eps=1e-4", "optim.weight_decay=0.1",
]


def make_algo(tmp_path, shape=None, *extra):
    mesh = make_mesh(*shape) if shape else make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    cfg = load_config(ROOT / "configs/dpo_tiny.yaml", TINY + [f"train.out_dir={tmp_path}", *extra])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(tmp_path), log=lambda *a: None)
    return DPO(rt)


def run(algo, steps=1, batches=None):
    """(metrics per step, params after step 1, the algorithm's state after the last step, batches, roles)."""
    rt = algo.rt
    with use_rules(rt.mesh, rt.rules):
        it = algo.train_batches()
        batches = batches or [next(it) for _ in range(steps)]
        roles = roles_for(algo)
        state = algo.init_state(roles)
        algo.start(state, roles)
        metrics, first = [], None
        for b in batches:
            state, m = algo.step(state, roles, b)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
            first = first or jax.device_get(state.params)
    return metrics, first, state, batches, roles


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    algo = make_algo(tmp_path_factory.mktemp("single"))
    with use_rules(algo.rt.mesh, algo.rt.rules):
        ref_before = jax.device_get(algo.init_state(roles_for(algo)).params)
    batch = next(algo.train_batches())
    metrics, first, state, batches, roles = run(algo, batches=[batch] * 3)  # the same batch: its loss must fall
    return dict(algo=algo, metrics=metrics, params=first, batches=batches, ref_before=ref_before, state=state,
                roles=roles)


def test_policy_equal_to_reference_gives_log2_and_zero_accuracy(reference):
    m = reference["metrics"][0]
    assert m["preference_loss"] == float(np.float32(np.log(2.0)))  # exactly: delta is 0 bit for bit
    assert m["accuracy"] == 0.0  # ties count as wrong
    assert m["rewards_chosen_mean"] == m["rewards_rejected_mean"] == m["margin_mean"] == 0.0
    assert m["loss"] == pytest.approx(m["preference_loss"] + 0.5 * m["sft_loss"], rel=1e-6)
    assert m["num_pairs"] == 8 and m["skipped"] == 0
    # training on the batch moves the policy away from the reference, which prefers nothing
    assert reference["metrics"][-1]["preference_loss"] < m["preference_loss"]
    assert reference["metrics"][-1]["accuracy"] > 0


def test_reference_params_unchanged_by_training(reference):
    state = reference["state"]
    after = jax.device_get(reference["roles"]["reference"])
    jax.tree.map(np.testing.assert_array_equal, after, reference["ref_before"])
    moved = jax.device_get(state.params)["layers"]["q"]
    assert np.abs(moved - reference["ref_before"]["layers"]["q"]).max() > 1e-4


@pytest.mark.parametrize("shape,accum", [((8, 1, 1, 1), 1), ((2, 2, 2, 1), 2), ((1, 2, 2, 2), 1), ((2, 1, 1, 4), 1)])
def test_sharded_equals_single_device(shape, accum, reference, tmp_path):
    """(2,2,2,1) also runs 2 accumulation steps of 4 rows: accumulation == the big batch."""
    algo = make_algo(tmp_path, shape, f"train.micro_batch={8 // accum}")
    metrics, params, _, _, _ = run(algo, batches=reference["batches"][:1])
    ref = reference["metrics"][0]
    for k in ("loss", "preference_loss", "sft_loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(metrics[0][k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert_trees_close(params, reference["params"])


def test_precomputed_reference_equals_live(reference, tmp_path):
    algo = make_algo(tmp_path, None, "algorithm.reference=precomputed")
    metrics, params, _, _, roles = run(algo, batches=reference["batches"][:2])
    for got, want in zip(metrics, reference["metrics"][:2]):
        for k in ("loss", "preference_loss", "sft_loss", "accuracy", "margin_mean"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert_trees_close(params, reference["params"])
    store = tmp_path / "reference_logps"
    assert (store / "done.json").is_file() and (store / "train" / "ref_logps" / ".zarray").is_file()
    assert "reference" not in roles  # released after precomputation
    # a second run over the same data reuses the store instead of recomputing (and loads no reference)
    again = make_algo(tmp_path, None, "algorithm.reference=precomputed")
    assert again.columns.ready() and "reference" not in again.role_specs()


def test_overlong_pairs_truncate_prompt_left_then_response_or_drop():
    fitted, status = fit_responses([1, 2, 3, 4, 5], [[6, 7], [8, 9, 10]], max_ids=6, overlong="truncate")
    assert status == "truncated"
    assert fitted[0] == ([3, 4, 5, 6, 7], [0, 0, 0, 1, 1]) and fitted[1] == ([3, 4, 5, 8, 9, 10], [0, 0, 0, 1, 1, 1])
    fitted, status = fit_responses([1, 2, 3], [[6, 7, 8, 9], [4]], max_ids=3, overlong="truncate")
    assert status == "truncated" and fitted[0] == ([3, 6, 7], [0, 1, 1])  # one prompt token always kept
    assert fit_responses([1, 2, 3], [[6, 7, 8, 9], [4]], max_ids=3, overlong="drop") == (None, "dropped")
    assert fit_responses([1, 2], [[], [4]], max_ids=8, overlong="truncate") == (None, "dropped")  # empty response
    tok = load_tokenizer("byte")
    long_prompt = "1+1=" * 10
    ex = [PreferenceExample("2+2=", "4", "5"), PreferenceExample(long_prompt, "2", "3"),
          PreferenceExample("3+3=", "6" * 40, "7")]
    records, counts = tokenize_pairs(ex, tok, "tiny", seq_len=16, overlong="truncate")
    assert counts == {"examples": 3, "truncated": 2, "dropped": 0, "degenerate": 0}
    for r in records:
        for side in ("chosen", "rejected"):
            ids, mask = r[side]
            assert len(ids) - 1 <= 16 and mask[1:].sum() >= 1  # every pair keeps a response
    records, counts = tokenize_pairs(ex, tok, "tiny", seq_len=16, overlong="drop")
    assert counts == {"examples": 1, "truncated": 0, "dropped": 2, "degenerate": 0} and [r["index"] for r in records] == [0]
    # sides that differ only past seq_len would be identical rows: dropped, never trained on
    records, counts = tokenize_pairs([PreferenceExample("3+3=", "6" * 40, "6" * 39 + "7")], tok, "tiny", seq_len=16)
    assert records == [] and counts == {"examples": 0, "truncated": 0, "dropped": 1, "degenerate": 0}


def test_train_end_to_end_precomputed(tmp_path):
    out = tmp_path / "dpo"
    cfg = load_config(ROOT / "configs/dpo_tiny.yaml", TINY + [
        f"train.out_dir={out}", "train.steps=12", "train.eval_every=12", "train.checkpoint_every=12",
        "mesh.data=4", "mesh.fsdp=2", "algorithm.reference=precomputed", "algorithm.sft_weight=0.0",
        "algorithm.length_normalize=false", f"train.export_hf={tmp_path / 'hf'}",
        "data.train=builtin:addition_pairs:train:8"])  # ~30 pairs: 3 epochs in 12 steps, so the loss must fall
    last = train(cfg)
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12
    assert losses[0] == pytest.approx(np.log(2.0), abs=1e-6)
    assert np.mean(losses[-3:]) < losses[0] - 0.05
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 12]  # the starting point is evaluated too
    assert evals[0]["eval/accuracy"] == 0.0 and evals[0]["eval/preference_loss"] == pytest.approx(np.log(2), abs=1e-6)
    # training moved the policy off the reference on held-out pairs too, and the reduced eval loss is the sum
    # of its terms (sft_weight 0 here)
    assert last["eval/accuracy"] > 0.2 and "eval/exact_match" in last
    assert last["eval/loss"] == pytest.approx(last["eval/preference_loss"], rel=1e-6)
    assert (tmp_path / "hf" / "config.json").is_file()
    done = json.loads((out / "reference_logps" / "done.json").read_text())
    from jalign.data.tiny import preference_pairs
    assert done["train"][0] == len(preference_pairs("train", 8))  # one reference row per training pair


# ---- the other pairwise losses and the reference-free ones, through the algorithm ----------------------
def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_preference(name, a, pc, pr, rc, rr, mc, mr):
    """Each loss's formula (its docstring / paper) in NumPy: per-pair values, then the mean. pc, pr: policy
    log-prob sums; rc, rr: the reference's; mc, mr: response lengths (SimPO / ORPO average; so does
    length_normalize for the others)."""
    beta, e = a.beta, a.label_smoothing
    smoothed = lambda z: -(1 - e) * _log_sigmoid(z) - e * _log_sigmoid(-z)  # noqa: E731  (cDPO-style eps)
    if name in ("orpo", "simpo"):
        lc, lr = pc / mc, pr / mr
        if name == "simpo":
            return np.mean(smoothed(beta * (lc - lr) - a.gamma))
        log_odds = (lc - lr) - (np.log1p(-np.exp(lc)) - np.log1p(-np.exp(lr)))
        return beta * np.mean(-_log_sigmoid(log_odds))
    if name == "cpo":  # sums by definition; length_normalize (on in TINY) asks for means
        return np.mean(smoothed(beta * (pc / mc - pr / mr)))
    pc, pr, rc, rr = pc / mc, pr / mr, rc / mc, rr / mr  # length_normalize is on in TINY
    x, y = pc - rc, pr - rr
    d = x - y
    if name == "slic":
        per = np.maximum(0.0, a.margin - beta * d)
    elif name == "robust":
        per = (-(1 - e) * _log_sigmoid(beta * d) + e * _log_sigmoid(-beta * d)) / (1 - 2 * e)
    elif name == "apo_zero":
        per = _sigmoid(-beta * x) + _sigmoid(beta * y)
    elif name == "apo_down":
        per = _sigmoid(beta * x) + _sigmoid(-beta * d)
    elif name == "sppo_hard":
        per = (x - 0.5 / beta) ** 2 + (y + 0.5 / beta) ** 2
    elif name == "nca_pair":
        per = -_log_sigmoid(beta * x) - 0.5 * _log_sigmoid(-beta * x) - 0.5 * _log_sigmoid(-beta * y)
    elif name == "bco_pair":
        shift = np.mean(0.5 * beta * (x + y))  # the batch's mean implicit reward
        per = -_log_sigmoid(beta * x - shift) - _log_sigmoid(-(beta * y - shift))
    return np.mean(per)


NEW_LOSSES = ["slic", "robust", "apo_zero", "apo_down", "sppo_hard", "nca_pair", "bco_pair", "orpo", "simpo", "cpo"]


def test_new_losses_through_the_algorithm_match_their_formulas(reference, tmp_path):
    """The algorithm's preference term for every new ``algorithm.loss`` equals its formula on log-probs scored
    independently (jalign.models.heads.token_logps), with a trained policy against the initial reference."""
    from jalign.models.heads import token_logps

    batch = reference["batches"][0]
    policy, ref = jax.device_get(reference["params"]), reference["ref_before"]
    sums = {}  # the independent log-prob sums: one batch, the same for every loss (the first algorithm's layout)
    for name in NEW_LOSSES:
        algo = make_algo(tmp_path / name, None, f"algorithm.loss={name}", "algorithm.label_smoothing=0.1",
                         "algorithm.margin=0.7", "algorithm.gamma=0.3", "algorithm.beta=0.5")
        cfg = algo.cfg.model
        with use_rules(algo.rt.mesh, algo.rt.rules):
            placed = algo.global_batch(batch, accum=1)
            flat = jax.tree.map(lambda x: x[0], placed)
            for who, params in (("pi", policy), ("ref", ref)):
                for s in (0, 1):
                    if (who, s) not in sums:
                        rows = {k: flat[k][:, s] for k in ("tokens", "targets", "positions", "segment_ids",
                                                           "loss_mask")}
                        lp = np.asarray(token_logps(params, rows, cfg))
                        sums[who, s] = (lp * np.asarray(rows["loss_mask"])).sum(-1)
            lengths = np.asarray(batch["loss_mask"]).sum(-1)
            want = _numpy_preference(name, algo.a, sums["pi", 0], sums["pi", 1], sums["ref", 0], sums["ref", 1],
                                     lengths[:, 0], lengths[:, 1])
            norms = dict(algo.normalizers(placed))
            roles = {} if algo.reference_free else {"reference": ref}
            if algo.batch_statistics() is not None:
                norms.update(algo.batch_statistics()(policy, roles, placed))
            loss, m = algo.loss(policy, flat, norms, roles)
        np.testing.assert_allclose(float(m["preference_loss"]), want, rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(float(loss), float(m["preference_loss"]) + 0.5 * float(m["sft_loss"]), rtol=1e-6)
        assert algo.reference_free == (name in ("orpo", "simpo", "cpo"))


def test_reference_free_losses_build_no_reference(tmp_path):
    from jalign.config import ConfigError

    algo = make_algo(tmp_path, None, "algorithm.loss=simpo")
    assert algo.role_specs() == {} and algo.step_roles == ()
    roles = roles_for(algo)
    assert roles.params == {}  # not one parameter of a second model exists
    with pytest.raises(ConfigError, match="roles.reference is set but algorithm.loss=orpo uses no reference"):
        make_algo(tmp_path, None, "algorithm.loss=orpo", "roles.reference=policy-init")
    with pytest.raises(ConfigError, match="algorithm.reference=precomputed but algorithm.loss=cpo"):
        make_algo(tmp_path, None, "algorithm.loss=cpo", "algorithm.reference=precomputed")


@pytest.mark.parametrize("loss", ["simpo", "bco_pair"])
def test_reference_free_and_bco_sharded_and_accumulated(loss, tmp_path):
    """A reference-free loss and BCO (whose reward shift is a statistic of the whole optimizer batch):
    one device == (2,2,2,1) with 2 accumulation steps == (1,2,2,2); the loss falls on a repeated batch."""
    single = make_algo(tmp_path / "one", None, f"algorithm.loss={loss}")
    batch = next(single.train_batches())
    want, want_params, _, _, _ = run(single, batches=[batch] * 3)
    assert want[-1]["preference_loss"] < want[0]["preference_loss"]
    for shape, accum in (((2, 2, 2, 1), 2), ((1, 2, 2, 2), 1)):
        algo = make_algo(tmp_path / f"{shape}", shape, f"algorithm.loss={loss}", f"train.micro_batch={8 // accum}")
        got, params, _, _, _ = run(algo, batches=[batch])
        for k in ("loss", "preference_loss", "sft_loss", "accuracy", "grad_norm"):
            np.testing.assert_allclose(got[0][k], want[0][k], rtol=1e-5, atol=1e-7, err_msg=f"{shape} {k}")
        assert_trees_close(params, want_params)
