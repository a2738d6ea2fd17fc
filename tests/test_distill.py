"""Knowledge distillation: top-k KD with k = vocab equals the full-vocabulary KL (NumPy, from both models'
logits) through the algorithm, live and precomputed; the stored top-k joined into packed rows by example and
position is the teacher's own; precomputed == live, sharded == unsharded with accumulation, the teacher
unchanged, resume == uninterrupted, config errors."""
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign import cli
from jalign.algorithms import base
from jalign.algorithms.distill import Distill
from jalign.config import ConfigError, load_config
from jalign.data.distill import INDEX
from jalign.metrics import read_metrics
from jalign.models import transformer as tfm
from jalign.trainer import train
from sharding import make_mesh, make_rules, use_rules
from helpers import assert_trees_close, roles_for
from test_seam import _assert_bitwise, _resume_pair

ROOT = Path(__file__).parent.parent
QUIET = ["train.progress=false", "train.tensorboard=false", "train.async_checkpointing=false", "train.log_every=1"]
STUDENT = ["model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4", "model.kv_heads=2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher of another size (2 layers x 48), 30 SFT steps away from random (peaked enough that its top-k
    distribution is far from a random student's)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(load_config(ROOT / "configs/sft_tiny.yaml", QUIET + [
        "model.hidden=48", "model.mlp=96", "model.layers=2", "model.heads=4", "model.kv_heads=2",
        "data.train=builtin:addition:train:64", "data.eval=null", "data.seq_len=32", "train.steps=30",
        "train.global_batch=8", "train.eval_every=0", f"train.out_dir={out}", "optim.lr=1e-2",
        "optim.warmup_steps=0"]))
    return out


def common(teacher):
    return STUDENT + QUIET + [
        f"roles.teacher=run:{teacher}", "data.train=builtin:addition_sloppy:train:8",
        "data.eval=builtin:addition:eval:8", "data.seq_len=32", "train.global_batch=8", "train.steps=6",
        "train.eval_batches=2", "eval.prompts=4", "eval.max_new_tokens=4", "algorithm.sft_weight=0.5",
        "algorithm.temperature=2.0", "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant",
        "optim.eps=1e-4"]


def make_algo(tmp_path, teacher, shape=None, *extra):
    mesh = make_mesh(*shape) if shape else make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    cfg = load_config(ROOT / "configs/distill_tiny.yaml", common(teacher) + [f"train.out_dir={tmp_path}", *extra])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(tmp_path), log=lambda *a: None)
    return Distill(rt)


def run(algo, batches):
    with use_rules(algo.rt.mesh, algo.rt.rules):
        roles = roles_for(algo)
        state = algo.init_state(roles)
        algo.start(state, roles)
        metrics, params = [], []
        for b in batches:
            state, m = algo.step(state, roles, b)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
            params.append(jax.device_get(state.params))
    return metrics, params, roles


def _logits(params, cfg, rows):
    h = tfm.forward(params, rows["tokens"], rows["positions"], rows["segment_ids"], cfg)
    return np.asarray(jax.device_get(h @ tfm.unembed_matrix(params, cfg)), np.float64)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _numpy_loss(t_logits, s_logits, targets, mask, k, tau, kd_loss, kd_weight, sft_weight):
    """kd_weight * (1/N) sum_t m_t D(p_k || q_k) + sft_weight * NLL, from both models' float64 logits: the
    teacher's top-k ids by argsort, both sides' log-probs there renormalised over the k ids at tau."""
    log_t, log_s = _log_softmax(t_logits), _log_softmax(s_logits)
    ids = np.argsort(-t_logits, axis=-1, kind="stable")[..., :k]
    log_p = _log_softmax(np.take_along_axis(log_t, ids, -1) / tau)
    log_q = _log_softmax(np.take_along_axis(log_s, ids, -1) / tau)
    if kd_loss == "fwd_kl":
        per = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    else:
        per = (np.exp(log_q) * (log_q - log_p)).sum(-1)
    n = mask.sum()
    kd = (per * mask).sum() / n
    nll = -(np.take_along_axis(log_s, targets[..., None], -1)[..., 0] * mask).sum() / n
    return kd_weight * kd + sft_weight * nll, kd, nll


@pytest.mark.parametrize("mode,k,kd_loss", [("live", 384, "fwd_kl"), ("precomputed", 384, "fwd_kl"),
                                            ("precomputed", 4, "fwd_kl"), ("live", 4, "bwd_kl")])
def test_loss_through_the_algorithm_equals_numpy(teacher, tmp_path, mode, k, kd_loss):
    """The algorithm's loss on one packed batch == a NumPy transcription from the two models' logits; with
    k = vocab (384) the top-k KL is the full-vocabulary KL(softmax(z_T/tau) || softmax(z_S/tau))."""
    algo = make_algo(tmp_path, teacher, None, f"algorithm.top_k={k}", f"algorithm.teacher={mode}",
                     f"algorithm.kd_loss={kd_loss}", "algorithm.kd_weight=0.7")
    batch = next(algo.train_batches())
    assert (batch["segment_ids"].max(-1) > 1).any()  # packed rows
    with use_rules(algo.rt.mesh, algo.rt.rules):
        roles = roles_for(algo)
        state = algo.init_state(roles)
        t_params, t_cfg = jax.device_get(roles["teacher"]), roles.config("teacher")
        algo.start(state, roles)
        placed = algo.global_batch(algo.prepare_batch(batch, "train"), accum=1)
        flat = jax.tree.map(lambda x: x[0], placed)
        loss, m = algo.loss(state.params, flat, algo.normalizers(placed), algo.step_inputs(roles))
        student = jax.device_get(state.params)
    mask = np.asarray(batch["loss_mask"], np.float64)
    want, kd, nll = _numpy_loss(_logits(t_params, t_cfg, batch), _logits(student, algo.cfg.model, batch),
                                np.asarray(batch["targets"]), mask, k, 2.0, kd_loss, 0.7, 0.5)
    np.testing.assert_allclose(float(m["kd_loss"]), kd, rtol=2e-5)
    np.testing.assert_allclose(float(m["sft_loss"]), nll, rtol=2e-5)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    assert t_cfg.layers == 2 and t_cfg.hidden == 48  # a teacher of another size than the 1-layer student


def test_stored_topk_joined_into_packed_rows_is_the_teachers_own(teacher, tmp_path):
    algo = make_algo(tmp_path, teacher, None, "algorithm.top_k=4")
    batch = next(algo.train_batches())
    with use_rules(algo.rt.mesh, algo.rt.rules):
        roles = roles_for(algo)
        t_params = roles["teacher"]
        algo.start(algo.init_state(roles), roles)
        assert "teacher" not in roles  # released once stored
        joined = algo.prepare_batch(batch, "train")
        ids, logps = jax.device_get(jax.jit(algo._topk)(t_params, {k: batch[k] for k in
                                                                    ("tokens", "positions", "segment_ids")}))
    m = batch["loss_mask"] > 0
    assert m.sum() > 10 and joined["teacher_ids"].shape == batch["tokens"].shape + (4,)
    np.testing.assert_array_equal(joined["teacher_ids"][m], ids[m])
    np.testing.assert_allclose(joined["teacher_logps"][m], logps[m], rtol=1e-5, atol=1e-6)
    assert (np.diff(joined["teacher_logps"][m], axis=-1) <= 0).all()  # decreasing, as NeMo-Aligner stores them
    store = tmp_path / "teacher_topk"
    assert (store / "train" / "teacher_ids" / ".zarray").is_file()
    again = make_algo(tmp_path, teacher, None, "algorithm.top_k=4")
    assert again.columns.ready() and again.role_specs() == {}  # a rerun loads no teacher


def test_mixture_and_named_eval_sets_read_their_own_examples(teacher, tmp_path):
    """Indices are unique across the sources of a training mixture and across named eval sets, so every
    token of a (packed) train row and of the second eval set reads its own example's stored top-k."""
    algo = make_algo(tmp_path, teacher, None, "algorithm.top_k=4",
                     "data.train=[builtin:addition_sloppy:train:8, builtin:addition:train:4]",
                     "data.eval={a: builtin:addition:eval:8, b: builtin:addition_sloppy:train:3}")
    d = algo.data
    assert [r["index"] for r in d.train_records] == list(range(len(d.train_records)))
    assert [r["index"] for r in d.eval_records] == list(range(len(d.eval_records)))
    d.select_eval("b")
    batches = {"train": next(algo.train_batches()), "eval": next(iter(algo.eval_batches()))}
    assert batches["eval"][INDEX].max() >= d.eval_sets["b"][0]  # rows of the second set
    with use_rules(algo.rt.mesh, algo.rt.rules):
        roles = roles_for(algo)
        t_params = roles["teacher"]
        algo.start(algo.init_state(roles), roles)
        topk = jax.jit(algo._topk)
        for split, batch in batches.items():
            joined = algo.prepare_batch(batch, split)
            ids, logps = jax.device_get(topk(t_params, {k: batch[k] for k in ("tokens", "positions", "segment_ids")}))
            m = batch["loss_mask"] > 0
            assert m.sum() > 10
            np.testing.assert_array_equal(joined["teacher_ids"][m], ids[m], err_msg=split)
            np.testing.assert_allclose(joined["teacher_logps"][m], logps[m], rtol=1e-5, atol=1e-6, err_msg=split)


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    algo = make_algo(tmp_path_factory.mktemp("live"), teacher, None, "algorithm.teacher=live")
    it = algo.train_batches()
    batches = [next(it) for _ in range(2)]
    with use_rules(algo.rt.mesh, algo.rt.rules):
        before = jax.device_get(roles_for(algo)["teacher"])
    metrics, params, roles = run(algo, batches)
    return dict(batches=batches, metrics=metrics, params=params, before=before, roles=roles)


def test_live_teacher_unchanged_and_precomputed_equals_live(reference, teacher, tmp_path):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(reference["roles"]["teacher"]), reference["before"])
    metrics, params, roles = run(make_algo(tmp_path, teacher), reference["batches"])
    assert "teacher" not in roles
    for got, want in zip(metrics, reference["metrics"]):
        for k in ("loss", "kd_loss", "sft_loss", "teacher_topk_mass", "grad_norm"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert_trees_close(params[1], reference["params"][1])


@pytest.mark.parametrize("shape,accum", [((2, 2, 2, 1), 2), ((1, 2, 2, 2), 1)])
def test_sharded_equals_single_device(reference, teacher, tmp_path, shape, accum):
    algo = make_algo(tmp_path, teacher, shape, "algorithm.teacher=live", f"train.micro_batch={8 // accum}")
    metrics, params, _ = run(algo, reference["batches"])
    for got, want in zip(metrics, reference["metrics"]):
        for k in ("loss", "kd_loss", "sft_loss", "grad_norm"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=f"{shape} {k}")
    assert_trees_close(params[1], reference["params"][1])


def test_resume_equals_uninterrupted(teacher, tmp_path):
    # common() sets train.steps=6, which would override the pair's own step count: leave it out
    extra = [o for o in common(teacher) if not o.startswith("train.steps=")]
    straight, sliced = _resume_pair(tmp_path, "configs/distill_tiny.yaml",
                                    extra + ["model.vocab_size=384", "data.eval=null", "train.eval_every=0"])
    _assert_bitwise(straight, sliced, 4)


def test_teacher_of_another_vocabulary_is_one_clear_error(teacher, tmp_path, capsys):
    """Through the command line: exit 2, one line naming the teacher, its vocabulary and the student's; no
    traceback, nothing trained."""
    out = tmp_path / "kd"
    rc = cli.main(["train", str(ROOT / "configs/distill_tiny.yaml"), *common(teacher), "model.vocab_size=512",
                   f"train.out_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"roles.teacher=run:{teacher}: vocab_size 384 differs from the student's 512" in err, err
    assert "Traceback" not in err and not (out / "checkpoints").exists()


def test_train_end_to_end_and_errors(teacher, tmp_path):
    out = tmp_path / "kd"
    last = train(load_config(ROOT / "configs/distill_tiny.yaml", common(teacher) + [
        f"train.out_dir={out}", "train.steps=8", "train.eval_every=8", "mesh.data=4", "mesh.fsdp=2",
        "algorithm.sft_weight=0", "algorithm.temperature=1"]))
    evals = [r for r in read_metrics(out) if "eval/kd_loss" in r]
    assert [r["step"] for r in evals] == [0, 8] and "eval/exact_match" in last
    # the student moves toward the teacher: the top-k KL to it on the held-out set falls
    assert evals[-1]["eval/kd_loss"] < 0.8 * evals[0]["eval/kd_loss"], evals
    with pytest.raises(ConfigError, match="distill needs a teacher: roles.teacher"):
        make_algo(tmp_path / "x", teacher, None, "roles.teacher=null")
    with pytest.raises(ConfigError, match=r"vocab_size 384 differs from the student's 512"):
        make_algo(tmp_path / "y", teacher, None, "model.vocab_size=512")
    with pytest.raises(ConfigError, match=r"algorithm.top_k=999 exceeds model.vocab_size=384"):
        make_algo(tmp_path / "z", teacher, None, "algorithm.top_k=999")
