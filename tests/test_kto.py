"""KTO: unpaired data (TRL's field names, mismatched KL rows), the reference point and weights against a NumPy
transcription of the paper's equations through the algorithm, sharded == unsharded, accumulation == big batch,
the frozen reference unchanged, precomputed == live, resume == uninterrupted, and the loop end to end."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign.algorithms import base
from jalign.algorithms.kto import KTO
from jalign.config import load_config
from jalign.data.chat import encode_pair
from jalign.data.formats import DataError, UnpairedExample, read_jsonl
from jalign.data.tokenizer import load_tokenizer
from jalign.data.unpaired import mismatched_partners, tokenize_unpaired
from jalign.metrics import read_metrics
from jalign.models.heads import token_logps
from jalign.trainer import train
from sharding import make_mesh, make_rules, use_rules
from helpers import assert_trees_close, roles_for
from test_seam import _assert_bitwise, _resume_pair

ROOT = Path(__file__).parent.parent
TINY = [
    "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4", "model.kv_heads=2", "model.init_from=null",
    "data.train=builtin:addition_unpaired:train:16", "data.eval=builtin:addition_unpaired:eval:8", "data.seq_len=16",
    "train.global_batch=8", "train.steps=10", "train.eval_batches=2", "train.log_every=1", "train.progress=false",
    "train.tensorboard=false", "train.async_checkpointing=false", "eval.prompts=4", "eval.max_new_tokens=4",
    "algorithm.desirable_weight=1.5", "algorithm.undesirable_weight=0.5", "algorithm.beta=0.5",
    "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", "optim.eps=1e-4", "optim.weight_decay=0.1",
]


def make_algo(tmp_path, shape=None, *extra):
    mesh = make_mesh(*shape) if shape else make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    cfg = load_config(ROOT / "configs/kto_tiny.yaml", TINY + [f"train.out_dir={tmp_path}", *extra])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(tmp_path), log=lambda *a: None)
    return KTO(rt)


def run(algo, batches):
    rt = algo.rt
    with use_rules(rt.mesh, rt.rules):
        roles = roles_for(algo)
        state = algo.init_state(roles)
        algo.start(state, roles)
        metrics, params = [], []
        for b in batches:
            state, m = algo.step(state, roles, b)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
            params.append(jax.device_get(state.params))
    return metrics, params, state, roles


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    algo = make_algo(tmp_path_factory.mktemp("single"))
    with use_rules(algo.rt.mesh, algo.rt.rules):
        ref_before = jax.device_get(algo.init_state(roles_for(algo)).params)
    it = algo.train_batches()
    batches = [next(it) for _ in range(3)]
    metrics, params, state, roles = run(algo, batches)
    return dict(algo=algo, metrics=metrics, params=params, batches=batches, ref_before=ref_before, state=state,
                roles=roles)


# ---- data -----------------------------------------------------------------------------------------
def test_unpaired_format_reads_trl_names_and_refuses_bad_labels(tmp_path):
    path = tmp_path / "u.jsonl"
    msgs = [{"role": "user", "content": "2+2="}]
    path.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": "1+1=", "completion": "2", "label": True},
        {"prompt": msgs, "completion": [{"role": "assistant", "content": "5"}], "label": False},  # conversational
        {"prompt": "3+3=", "response": "6", "label": True}]) + "\n")
    ex, _ = read_jsonl(path, "unpaired")
    assert [(e.completion if isinstance(e.completion, str) else e.completion[0]["content"], e.label) for e in ex] == \
        [("2", True), ("5", False), ("6", True)]
    path.write_text(json.dumps({"prompt": "1+1=", "completion": "2", "label": 1}) + "\n")
    with pytest.raises(DataError, match=r'u.jsonl:1: field "label" must be true \(desirable\) or false'):
        read_jsonl(path, "unpaired")
    path.write_text(json.dumps({"prompt": "1+1=", "completion": " ", "label": True}) + "\n")
    with pytest.raises(DataError, match=r'u.jsonl:1: field "completion" is empty'):
        read_jsonl(path, "unpaired")
    path.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    with pytest.raises(DataError, match=r'u.jsonl:1: missing field "label"'):
        read_jsonl(path, "unpaired")


def test_mismatched_rows_pair_each_prompt_with_another_prompts_completion():
    keys = ["a", "a", "b", "b", "c", "a", "c"]
    partners = mismatched_partners(keys, seed=3)
    assert all(p >= 0 and keys[p] != keys[i] for i, p in enumerate(partners))
    assert sorted(set(partners)) != [0]  # not everyone on one partner
    assert (mismatched_partners(["x", "x", "x"], seed=0) == -1).all()  # one distinct prompt: no KL row at all
    tok = load_tokenizer("byte")
    ex = [UnpairedExample("1+1=", "2", True), UnpairedExample("1+1=", "3", False), UnpairedExample("2+2=", "4", True),
          UnpairedExample("5+5=", "11", False)]
    records, counts = tokenize_unpaired(ex, tok, "tiny", seq_len=16, seed=0)
    assert counts["desirable"] == 2 and counts["undesirable"] == 2 and counts["kl_missing"] == 0
    partners = mismatched_partners([tuple(encode_pair(e.prompt, e.completion, "tiny", tok)[0]) for e in ex], 0)
    for i, r in enumerate(records):
        p, c = encode_pair(ex[i].prompt, ex[i].completion, "tiny", tok)
        assert r["completion"][0].tolist() == p + c and r["completion"][1].tolist() == [0] * len(p) + [1] * len(c)
        _, c_j = encode_pair(ex[partners[i]].prompt, ex[partners[i]].completion, "tiny", tok)
        assert ex[partners[i]].prompt != ex[i].prompt
        assert r["kl"][0].tolist() == p + c_j  # x_i followed by y_j, the response part masked for the log-prob
        assert r["kl"][1].tolist() == [0] * len(p) + [1] * len(c_j) and r["label"] == float(ex[i].label)
    records, counts = tokenize_unpaired(ex[:2], tok, "tiny", seq_len=16)
    assert counts["kl_missing"] == 2 and all(r["kl_valid"] == 0.0 for r in records)


# ---- the paper's equations through the algorithm ----------------------------------------------------
def _np_sequence_logps(params, rows, cfg):
    lp = np.asarray(token_logps(params, rows, cfg))
    return (lp * np.asarray(rows["loss_mask"])).sum(-1)


def test_kl_reference_point_and_weights_follow_the_paper(reference):
    """L = mean_i lambda_y_i - v_i with z0 = max(0, mean_j log pi(y'_j|x_j) - log ref(y'_j|x_j)) over the batch's
    mismatched rows (Ethayarajh et al. 2024, Sec. 4.1), recomputed in NumPy from independently scored rows, for a
    reference point that is clamped (the trained policy) and one that is not (the roles swapped)."""
    algo = reference["algo"]
    a, cfg = algo.a, algo.cfg.model
    trained = jax.device_get(reference["params"][1])
    init = reference["ref_before"]
    batch = reference["batches"][2]
    with use_rules(algo.rt.mesh, algo.rt.rules):
        placed = algo.global_batch(batch, accum=1)
        flat = jax.tree.map(lambda x: x[0], placed)
        seen = []
        for policy, ref in ((trained, init), (init, trained)):
            rows = [{k: flat[k][:, s] for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
                    for s in (0, 1)]
            pi, pr = (_np_sequence_logps(policy, r, cfg) for r in rows)
            qi, qr = (_np_sequence_logps(ref, r, cfg) for r in rows)
            v = np.asarray(batch["valid"]) * (np.asarray(batch["loss_mask"])[:, 0].sum(-1) > 0)
            kv = v * np.asarray(batch["kl_valid"])
            estimate = float(((pr - qr) * kv).sum() / kv.sum())
            z0 = max(0.0, estimate)
            r = pi - qi
            d = np.asarray(batch["label"]) > 0
            value = np.where(d, a.desirable_weight / (1 + np.exp(-a.beta * (r - z0))),
                             a.undesirable_weight / (1 + np.exp(-a.beta * (z0 - r))))
            lam = np.where(d, a.desirable_weight, a.undesirable_weight)
            want = float(((lam - value) * v).sum() / v.sum())
            norms = dict(jax.device_get(algo.normalizers(placed)))
            stats = jax.device_get(algo.batch_statistics()(policy, {"reference": ref}, placed))
            np.testing.assert_allclose(float(stats["kto_kl"]), estimate, rtol=1e-5, atol=1e-6)  # unclamped here
            loss, m = algo.loss(policy, flat, {**norms, **stats}, {"reference": ref})
            np.testing.assert_allclose(float(loss), want, rtol=1e-5)
            np.testing.assert_allclose(float(m["kl"]), z0, rtol=1e-5, atol=1e-6)
            seen.append(estimate)
    assert min(seen) < 0 < max(seen)  # both branches of max(0, KL) were exercised


def test_policy_equal_to_reference_and_training(reference):
    m = reference["metrics"]
    # at the start r = 0 and z0 = 0: each item contributes lambda / 2
    want = (1.5 * m[0]["desirable_fraction"] + 0.5 * (1 - m[0]["desirable_fraction"])) / 2
    assert m[0]["loss"] == pytest.approx(want, rel=1e-6) and m[0]["kl"] == 0.0 and m[0]["skipped"] == 0
    assert m[0]["num_seqs"] == 8


def test_reference_params_unchanged_by_training(reference):
    after = jax.device_get(reference["roles"]["reference"])
    jax.tree.map(np.testing.assert_array_equal, after, reference["ref_before"])
    moved = jax.device_get(reference["state"].params)["layers"]["q"]
    assert np.abs(moved - reference["ref_before"]["layers"]["q"]).max() > 1e-4


@pytest.mark.parametrize("shape,accum", [((8, 1, 1, 1), 1), ((2, 2, 2, 1), 2), ((1, 2, 2, 2), 1)])
def test_sharded_equals_single_device(shape, accum, reference, tmp_path):
    """(2,2,2,1) also runs 2 accumulation steps of 4 rows: the reference point and the loss are those of the
    big batch (the KL is estimated over the whole optimizer batch)."""
    algo = make_algo(tmp_path, shape, f"train.micro_batch={8 // accum}")
    metrics, params, _, _ = run(algo, reference["batches"][:2])
    for got, want in zip(metrics, reference["metrics"][:2]):
        for k in ("loss", "kl", "accuracy", "rewards_desirable", "grad_norm"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert_trees_close(params[1], reference["params"][1])


def test_precomputed_reference_equals_live(reference, tmp_path):
    algo = make_algo(tmp_path, None, "algorithm.reference=precomputed")
    metrics, params, _, roles = run(algo, reference["batches"][:2])
    for got, want in zip(metrics, reference["metrics"][:2]):
        for k in ("loss", "kl", "accuracy", "rewards_undesirable"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert_trees_close(params[1], reference["params"][1])
    assert "reference" not in roles and (tmp_path / "reference_logps" / "train" / "ref_logps" / ".zarray").is_file()
    again = make_algo(tmp_path, None, "algorithm.reference=precomputed")
    assert again.columns.ready() and again.role_specs() == {}  # a rerun loads no reference at all


RESUME = ["data.train=builtin:addition_unpaired:train:8", "data.eval=null", "data.seq_len=16",
          "train.global_batch=8", "train.eval_every=0", "optim.lr=1e-2", "optim.warmup_steps=0"]


@pytest.mark.parametrize("ref", ["live", "precomputed"])
def test_resume_equals_uninterrupted(tmp_path, ref):
    straight, sliced = _resume_pair(tmp_path, "configs/kto_tiny.yaml", [*RESUME, f"algorithm.reference={ref}"])
    _assert_bitwise(straight, sliced, 4)


def test_train_end_to_end(tmp_path):
    out = tmp_path / "kto"
    last = train(load_config(ROOT / "configs/kto_tiny.yaml", TINY + [
        f"train.out_dir={out}", "train.steps=12", "train.eval_every=12", "mesh.data=4", "mesh.fsdp=2",
        "data.train=builtin:addition_unpaired:train:4"]))  # ~30 rows: 3 epochs in 12 steps
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0] - 0.05
    evals = [r for r in read_metrics(out) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 12] and "eval/exact_match" in last
    assert evals[0]["eval/accuracy"] == 0.0  # policy == reference: r = z0 = 0 is neither above nor below
