"""LoRA through the algorithm seam: only adapters (+ heads) train, the base is a frozen role (the DPO reference
for free), resume == uninterrupted, sharded == unsharded, QLoRA trains, exports load in transformers / peft."""
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign.algorithms import base
from jalign.algorithms.dpo import DPO
from jalign.algorithms.sft import SFT
from jalign.checkpoint import load_params
from jalign.config import load_config
from jalign.metrics import read_metrics
from jalign.models import lora as lora_lib
from jalign.trainer import train
from sharding import make_mesh, make_rules, use_rules

from helpers import assert_trees_close, roles_for

ROOT = Path(__file__).parent.parent
MODEL = ["model.vocab_size=288", "model.hidden=32", "model.mlp=64", "model.layers=2", "model.heads=4",
         "model.kv_heads=2", "model.init_from=null", "model.lora.rank=4", "model.lora.alpha=8"]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.async_checkpointing=false", "train.log_every=1",
         "optim.lr=1e-2", "optim.warmup_steps=0", "optim.eps=1e-4", "optim.schedule=constant"]
PAIRS = ["data.train=builtin:addition_pairs:train:8", "data.eval=null", "data.seq_len=16", "train.global_batch=8",
         "train.eval_every=0", "algorithm.sft_weight=0.5"]


def make(cls, config, shape, tmp_path, *extra):
    mesh = make_mesh(*shape) if shape else make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    data = PAIRS if cls is DPO else []
    cfg = load_config(ROOT / config, [*MODEL, *QUIET, *data, f"train.out_dir={tmp_path}", *extra])
    return cls(base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(tmp_path), log=lambda *_: None))


def steps(algo, batches):
    with use_rules(algo.rt.mesh, algo.rt.rules):
        roles = roles_for(algo)
        state = algo.init_state(roles)
        algo.start(state, roles)
        base_before = jax.device_get(roles["base"])
        metrics = []
        for b in batches:
            state, m = algo.step(state, roles, b)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state, roles, metrics, base_before


@pytest.fixture(scope="module")
def dpo_reference(tmp_path_factory):
    algo = make(DPO, "configs/dpo_tiny.yaml", None, tmp_path_factory.mktemp("dpo"))
    batch = next(algo.train_batches())
    state, roles, metrics, base_before = steps(algo, [batch] * 6)  # B starts at 0: the first step moves only B
    return dict(algo=algo, batch=batch, state=state, roles=roles, metrics=metrics, base_before=base_before)


def test_dpo_with_lora_trains_adapters_only_and_the_base_is_the_reference(dpo_reference):
    r = dpo_reference
    algo, state, roles = r["algo"], r["state"], r["roles"]
    assert set(roles.params) == {"base"}  # no second copy of the model for the reference
    assert set(state.params) == {"layers"} and set(state.params["layers"]) == set(lora_lib.TARGETS)
    n_adapter = lora_lib.param_count(state.params)
    assert n_adapter == lora_lib.param_count(algo.decls) < lora_lib.param_count(roles["base"]) / 2
    # optimizer state: two Adam moments of the adapters (+ scalar counts), nothing of the base
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * n_adapter
    m0, m2 = r["metrics"][0], r["metrics"][-1]
    assert m0["preference_loss"] == float(np.float32(np.log(2.0)))  # B = 0: policy == base == reference exactly
    assert m2["loss"] < m0["loss"] - 0.1 and m2["preference_loss"] < m0["preference_loss"] and m2["accuracy"] > 0.5
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(roles["base"]), r["base_before"])  # frozen
    moved = np.abs(jax.device_get(state.params)["layers"]["q"]["b"]).max()
    assert moved > 1e-4


@pytest.mark.parametrize("shape", [(2, 2, 2, 1), (1, 4, 2, 1)])
def test_lora_dpo_step_sharded_equals_single_device(dpo_reference, tmp_path, shape):
    algo = make(DPO, "configs/dpo_tiny.yaml", shape, tmp_path)
    state, _, metrics, _ = steps(algo, [dpo_reference["batch"]])
    _, _, ref_metrics, _ = steps(make(DPO, "configs/dpo_tiny.yaml", None, tmp_path / "one"), [dpo_reference["batch"]])
    for k in ("loss", "preference_loss", "sft_loss", "grad_norm"):
        np.testing.assert_allclose(metrics[0][k], ref_metrics[0][k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_lora_sft_merged_export_equals_base_plus_adapters_and_resume_is_exact(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    straight, sliced, hf = tmp_path / "straight", tmp_path / "sliced", tmp_path / "hf"
    sft = ["data.train=builtin:addition:train:64", "data.eval=null", "data.seq_len=32", "train.global_batch=8",
           "train.eval_every=0", "train.steps=4", "train.checkpoint_every=2"]
    args = [*MODEL, *QUIET, *sft]
    train(load_config(ROOT / "configs/sft_tiny.yaml", [*args, f"train.out_dir={straight}", f"train.export_hf={hf}"]))
    train(load_config(ROOT / "configs/sft_tiny.yaml", [*args, f"train.out_dir={sliced}", "train.stop_after_steps=2"]))
    train(load_config(ROOT / "configs/sft_tiny.yaml", [*args, f"train.out_dir={sliced}"]))
    a = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(sliced) if "loss" in r}
    assert a == b and a[4] < a[1]  # resumed bitwise (the base is rebuilt, the adapters restored)
    adapters = jax.device_get(load_params(straight))
    jax.tree.map(np.testing.assert_array_equal, adapters, jax.device_get(load_params(sliced)))
    assert set(adapters) == {"layers"}  # the checkpoint holds the adapters only
    # the merged HF export computes what base + adapters compute in jalign
    algo = make(SFT, "configs/sft_tiny.yaml", None, tmp_path / "x", *sft)
    with use_rules(algo.rt.mesh, algo.rt.rules):
        roles = roles_for(algo)
        params, cfg = algo.trainable.forward_params(adapters, roles), algo.cfg.model
        ids = np.array([[1, 4, 20, 30, 40, 5, 60, 61]], np.int32)
        seg = np.ones_like(ids)
        pos = np.arange(8, dtype=np.int32)[None]
        from jalign.models import transformer as tfm

        ours = np.asarray(jax.jit(lambda p: tfm.lm_logits(p, tfm.forward(p, ids, pos, seg, cfg), cfg))(params))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    # the PEFT adapter beside it loads over the HF base (the base is the random init: save it as HF first)
    peft = pytest.importorskip("peft")
    from jalign.models.hf_io import save_hf

    save_hf(jax.device_get(roles["base"]), cfg, tmp_path / "base")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    with torch.no_grad():
        tuned = peft.PeftModel.from_pretrained(hf_base, hf / "adapter").eval()(
            input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(tuned, ours, rtol=1e-4, atol=1e-4)


def test_qlora_sft_on_an_nf4_base_learns(tmp_path):
    out = tmp_path / "q"
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", [
        *MODEL, *QUIET, "model.hidden=64", "model.quantize_base=nf4", "data.train=builtin:addition:train:32",
        "data.eval=null", "data.seq_len=32", "train.global_batch=8", "train.eval_every=0", "train.steps=12",
        f"train.out_dir={out}"])
    train(cfg)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0] - 0.5
