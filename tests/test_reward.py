"""Reward models: score at the last valid token, sharded == unsharded, accumulation == big batch,
regression with masked attributes, Hugging Face export, and the loop end to end."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.algorithms import base
from jalign.algorithms.reward import RewardModel
from jalign.models.heads import last_valid_index, sequence_scores as reward_scores
from jalign.config import ModelConfig, load_config
from jalign.data.tokenizer import load_tokenizer
from jalign.metrics import read_metrics
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from jalign.trainer import train
from sharding import make_mesh, make_rules, use_rules
from helpers import assert_trees_close, roles_for

ROOT = Path(__file__).parent.parent
TINY = [
    "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4", "model.kv_heads=2", "model.init_from=null",
    "data.train=builtin:addition_pairs:train:64", "data.eval=builtin:addition_pairs:eval:16", "data.seq_len=16",
    "train.global_batch=8", "train.steps=10", "train.eval_batches=2", "train.log_every=1", "train.progress=false",
    "train.tensorboard=false", "train.async_checkpointing=false",
    "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", "optim.eps=1e-4", "optim.weight_decay=0.1",
]


# The embedding gradient of a reward model sums many cancelling contributions (float32 noise ~1e-5 of its
# scale differs between shardings); Adam's first step amplifies that by lr / eps, so lr = eps here.
PAIR = ("algorithm.loss=bt_margin", "algorithm.margin_scale=0.5", "optim.lr=1e-3", "optim.eps=1e-3")


def make_algo(tmp_path, shape=None, *extra):
    mesh = make_mesh(*shape) if shape else make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    cfg = load_config(ROOT / "configs/rm_tiny.yaml", TINY + [f"train.out_dir={tmp_path}", *extra])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(tmp_path), log=lambda *a: None)
    return RewardModel(rt)


def run(algo, batches):
    rt = algo.rt
    with use_rules(rt.mesh, rt.rules):
        roles = roles_for(algo)
        state = algo.init_state(roles)
        metrics = []
        for b in batches:
            state, m = algo.step(state, roles, b)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return metrics, state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    algo = make_algo(tmp_path_factory.mktemp("single"), None, *PAIR)
    batch = next(algo.train_batches())
    metrics, state = run(algo, [batch])
    return dict(batch=batch, metrics=metrics, params=jax.device_get(state.params))


def test_first_step_metrics(reference, tmp_path):
    """The first step's metrics are the margin loss of the initial model's scores, checked with NumPy."""
    m = reference["metrics"][0]
    assert m["num_pairs"] == 8 and m["skipped"] == 0
    # the margin version of BT: m = margin_scale * (R_c - R_r) = 0.5 with the tiny task's rewards 1 / 0
    b = reference["batch"]
    assert np.all(b["rewards"][:, 0] == 1.0) and np.all(b["rewards"][:, 1] == 0.0)
    algo = make_algo(tmp_path, None, *PAIR)
    with use_rules(algo.rt.mesh, algo.rt.rules):
        params = algo.init_state(roles_for(algo)).params  # the weights the first step scored with
    flat = {k: b[k].reshape((16,) + b[k].shape[2:]) for k in ("tokens", "positions", "segment_ids")}
    r = np.asarray(jax.jit(lambda p: reward_scores(p, flat["tokens"], flat["positions"], flat["segment_ids"],
                                                   algo.cfg.model))(params))[:, 0].astype(np.float64)
    r_c, r_r = r[0::2], r[1::2]
    margin = 0.5 * (b["rewards"][:, 0] - b["rewards"][:, 1])
    loss = np.mean(np.logaddexp(0.0, -(r_c - r_r - margin)))  # -log sigmoid(r_c - r_r - m)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
    assert m["accuracy"] == np.mean(r_c > r_r)
    np.testing.assert_allclose(m["reward_chosen_mean"], r_c.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["reward_std"], np.concatenate([r_c, r_r]).std(), rtol=1e-4)


@pytest.mark.parametrize("shape,accum", [((8, 1, 1, 1), 1), ((2, 2, 2, 1), 2), ((1, 2, 2, 2), 1)])
def test_sharded_equals_single_device(shape, accum, reference, tmp_path):
    """(2,2,2,1) also runs 2 accumulation steps of 4 rows: accumulation == the big batch."""
    algo = make_algo(tmp_path, shape, *PAIR, f"train.micro_batch={8 // accum}")
    metrics, state = run(algo, [reference["batch"]])
    for k in ("loss", "accuracy", "reward_chosen_mean", "reward_rejected_mean", "reward_std", "grad_norm"):
        np.testing.assert_allclose(metrics[0][k], reference["metrics"][0][k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert_trees_close(jax.device_get(state.params), reference["params"])


def test_score_is_read_at_the_last_valid_token():
    cfg = ModelConfig(vocab_size=64, hidden=32, mlp=64, layers=1, heads=4, kv_heads=2)
    params = params_lib.init_params(tfm.declare_params(cfg, lm_head=False, score_outputs=2), 0)
    rng = np.random.default_rng(0)
    T, lengths = 12, np.array([5, 12, 1])
    seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    pos = np.where(seg > 0, np.arange(T)[None], 0).astype(np.int32)
    tokens = (rng.integers(3, 64, (3, T)) * seg).astype(np.int32)
    score = jax.jit(lambda t: reward_scores(params, t, pos, seg, cfg))
    base_scores = np.asarray(score(tokens))
    assert base_scores.shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(last_valid_index(jnp.asarray(seg))), lengths - 1)
    garbage = np.where(seg > 0, tokens, rng.integers(3, 64, (3, T))).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(score(garbage)), base_scores)  # padding is never read
    last = tokens.copy()
    last[0, lengths[0] - 1] = (last[0, lengths[0] - 1] + 1) % 64
    changed = np.asarray(score(last))
    assert np.abs(changed[0] - base_scores[0]).max() > 1e-6
    np.testing.assert_array_equal(changed[1:], base_scores[1:])
    # the reference: the score head applied to the hidden state of the last valid position
    all_positions = jax.jit(lambda t: tfm.score_head(params, tfm.forward(params, t, pos, seg, cfg)))(tokens)
    manual = np.stack([np.asarray(all_positions)[i, n - 1] for i, n in enumerate(lengths)])
    np.testing.assert_allclose(base_scores, manual, rtol=1e-5, atol=1e-6)


def test_regression_masks_unlabelled_attributes(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(32):
        a, b = rng.integers(10, 99, 2)
        attrs = {"helpful": float(i % 5), "correct": None if i % 3 == 0 else float(i % 2) * 4}
        lines.append(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b + i % 2), "attributes": attrs}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[:8]) + "\n")
    algo = make_algo(tmp_path, (8, 1, 1, 1), "algorithm.loss=regression", "algorithm.num_attributes=2",
                     f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}",
                     "optim.lr=3e-3")
    assert algo.data.attribute_names == ["correct", "helpful"]
    it = algo.train_batches()
    batches = [next(it) for _ in range(1)]
    assert batches[0]["attribute_mask"][:, 0].sum() < 8  # some "correct" labels are null
    metrics, state = run(algo, batches * 8)
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < 0.5 * losses[0]
    assert metrics[0]["num_values"] == batches[0]["attribute_mask"].sum()
    from jalign.evaluation import reduce_eval

    with use_rules(algo.rt.mesh, algo.rt.rules):
        ev = reduce_eval(algo, state, roles_for(algo), 0)
    assert set(ev) == {"loss", "mae", "mae_correct", "mae_helpful"}


def test_train_end_to_end_and_hf_export(tmp_path):
    out, hf = tmp_path / "rm", tmp_path / "hf"
    cfg = load_config(ROOT / "configs/rm_tiny.yaml", TINY + [
        f"train.out_dir={out}", "train.steps=12", "train.eval_every=12", "train.checkpoint_every=12",
        "mesh.data=4", "mesh.fsdp=2", f"train.export_hf={hf}",
        "data.train=builtin:addition_pairs:train:8"])  # ~30 pairs: 3 epochs in 12 steps, so the loss must fall
    last = train(cfg)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0] - 0.1
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["score.weight"] == "score.safetensors" and "lm_head.weight" not in index
    # the exported directory scores like jalign does
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from jalign.checkpoint import load_params

    params = load_params(out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf, torch_dtype=torch.float32).eval()
    ids = np.array([[1, 5, 60, 61, 62, 2, 0, 0], [1, 7, 70, 71, 72, 73, 74, 2]], np.int32)
    seg = (ids > 0).astype(np.int32)
    pos = np.where(seg > 0, np.arange(8)[None], 0).astype(np.int32)
    ours = np.asarray(jax.jit(lambda p: reward_scores(p, ids, pos, seg, cfg.model))(params))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(seg, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    # the loop's eval accuracy is the fraction of held-out pairs the trained model orders right: recount it
    # with transformers over the pairs the evaluation saw (train.eval_batches=2 batches of 8)
    from jalign.data.preference import PairData

    data = PairData(cfg, load_tokenizer("byte"), mode="score", log=lambda *_: None, process_index=0, process_count=1)
    pairs = data.eval_records[:2 * cfg.train.global_batch]
    right = []
    for rec in pairs:
        side = []
        for name in ("chosen", "rejected"):
            seq = torch.tensor(np.asarray(rec[name][0], np.int64))[None]
            with torch.no_grad():
                side.append(float(model(input_ids=seq).logits[0, 0]))
        right.append(side[0] > side[1])
    assert last["eval/accuracy"] == pytest.approx(np.mean(right), abs=1e-6)
    assert last["eval/num_pairs"] == len(pairs)
