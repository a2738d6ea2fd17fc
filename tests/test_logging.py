"""What a run logs: W&B (offline) gets the same scalars as TensorBoard, tokens/s of all tokens and of loss tokens
recounted from the batches, MFU and epoch by their formulas, the start-of-run line, sample completions as a
table, and the callbacks (on_start / on_step / on_eval / on_end, request_stop)."""
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from jalign.callbacks import Callback
from jalign.config import load_config
from jalign.metrics import read_metrics
from jalign.trainer import train

from log_readers import tensorboard_scalars, tensorboard_texts, wandb_history

ROOT = Path(__file__).parent.parent
ARGS = ["model.vocab_size=288", "model.hidden=32", "model.mlp=64", "model.layers=2", "model.heads=4",
        "model.kv_heads=2", "data.train=builtin:addition:train:64", "data.eval=builtin:addition:eval:16",
        "data.seq_len=32", "train.global_batch=8", "train.steps=4", "train.eval_every=2", "train.log_every=1",
        "train.checkpoint_every=2", "train.progress=false", "train.async_checkpointing=false", "eval.prompts=4",
        "eval.max_new_tokens=4", "eval.log_samples=2", "optim.warmup_steps=0"]


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def on_start(self, run):
        self.calls.append(("start", run.step))

    def on_step(self, run, step, metrics):
        self.calls.append(("step", step, metrics["loss"]))
        if step == self.stop_at:
            run.request_stop()

    def on_eval(self, run, step, metrics):
        params, _ = run.policy()  # an eval hook of the user's own: here the norm of the policy's parameters
        self.calls.append(("eval", step, sorted(metrics)))
        return {"param_norm": optax.tree.norm(params)}

    def on_end(self, run, metrics):
        self.calls.append(("end", run.step))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    pytest.importorskip("wandb")
    out = tmp_path_factory.mktemp("logged")
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", [*ARGS, f"train.out_dir={out}", "train.wandb.mode=offline",
                                                       "train.wandb.project=jalign-test"])
    rec = Recorder()
    last = train(cfg, callbacks=[rec])
    return dict(out=out, cfg=cfg, rec=rec, last=last)


def test_wandb_offline_has_the_scalars_tensorboard_has(logged):
    tb = tensorboard_scalars(logged["out"])
    wb: dict = {}
    for row in wandb_history(logged["out"]):
        for k, v in row.items():
            if not k.startswith("_") and isinstance(v, (int, float)) and not k.startswith("eval/samples/"):
                wb.setdefault(k, {})[row["_step"]] = v
    assert set(wb) == set(tb) and {"loss", "tokens_per_s", "loss_tokens_per_s", "mfu", "epoch", "eval/loss",
                                   "eval/param_norm", "model/params"} <= set(tb)
    for tag in tb:
        assert set(wb[tag]) == set(tb[tag]), tag
        for step, v in tb[tag].items():  # TensorBoard stores float32
            assert np.float32(wb[tag][step]) == np.float32(v), (tag, step)
    jsonl = {r["step"]: r["loss"] for r in read_metrics(logged["out"]) if "loss" in r}
    assert {s: np.float32(v) for s, v in jsonl.items()} == {s: np.float32(v) for s, v in wb["loss"].items()}


def test_sample_completions_are_a_table_in_tensorboard_and_wandb(logged):
    import json

    samples = [json.loads(line) for line in (logged["out"] / "samples.jsonl").read_text().splitlines()]
    texts = tensorboard_texts(logged["out"])["eval/samples"]
    assert set(texts) == {0, 2, 4} == {s["step"] for s in samples}
    for step, table in texts.items():
        rows = table.splitlines()[2:]
        assert len(rows) == sum(s["step"] == step for s in samples) == 2
        assert all(f"| {s['response']} | {s['reference']} |" in table for s in samples if s["step"] == step)
    tables = [r for r in wandb_history(logged["out"]) if r.get("eval/samples/_type") == "table-file"]
    assert [r["_step"] for r in tables] == [0, 2, 4] and all(r["eval/samples/nrows"] == 2 for r in tables)


def _batches(cfg, n):
    """The run's first n training batches, rebuilt from the same config (deterministic data)."""
    from jalign.algorithms import base
    from jalign.algorithms.sft import SFT
    from sharding import make_mesh, make_rules

    algo = SFT(base.Runtime(cfg=cfg, mesh=make_mesh(8, 1, 1, 1), rules=make_rules(), run_dir=Path("/nonexistent"),
                            log=lambda *_: None))
    it = algo.train_batches()
    return algo, [next(it) for _ in range(n)]


def test_tokens_per_s_counts_every_token_and_loss_tokens_are_named_so(logged):
    algo, batches = _batches(logged["cfg"], 4)
    rows = {r["step"]: r for r in read_metrics(logged["out"]) if "loss" in r}
    examples = 0
    for step, batch in enumerate(batches, start=1):
        r = rows[step]
        all_tokens = int((batch["segment_ids"] > 0).sum())
        loss_tokens = float(batch["loss_mask"].sum())
        assert r["num_tokens"] == loss_tokens and all_tokens > loss_tokens  # prompts carry no loss
        # one window per log step: the same elapsed time divides both counts
        np.testing.assert_allclose(r["loss_tokens_per_s"] / r["tokens_per_s"], loss_tokens / all_tokens, rtol=1e-9)
        examples += sum(len(set(row[row > 0])) for row in batch["segment_ids"])
        np.testing.assert_allclose(r["epoch"], examples / len(algo.data.train_records), rtol=1e-9)


def test_mfu_is_model_flops_over_the_peak(logged):
    from jalign import throughput as tp

    cfg = logged["cfg"]
    fpt = tp.train_flops_per_token(cfg.model, cfg.data.seq_len)
    peak = tp.measured_peak_flops(cfg.model.dtype)  # measured once in this process: the run's own figure
    for r in read_metrics(logged["out"]):
        if "mfu" in r:
            np.testing.assert_allclose(r["mfu"], r["tokens_per_s"] * fpt / (peak * jax.device_count()), rtol=1e-9)


def test_flops_per_token_against_a_transformers_model():
    """6 N + 12 L H Q T with N counted from a transformers Llama of the same shape (its matrices, not the
    embedding lookup), and the LoRA variant 4 N + 6 N_adapters."""
    transformers = pytest.importorskip("transformers")
    from jalign import throughput as tp
    from jalign.config import LoRAConfig, ModelConfig
    from jalign.models import lora as lora_lib

    m = ModelConfig(vocab_size=96, hidden=32, mlp=80, layers=3, heads=4, kv_heads=2)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))
    n = sum(p.numel() for name, p in hf.named_parameters() if p.ndim >= 2 and "embed_tokens" not in name)
    attention = 12 * 3 * 4 * 8 * 64
    assert tp.train_flops_per_token(m, 64) == 6 * n + attention
    adapters = lora_lib.declare_lora(m, LoRAConfig(rank=4))
    n_lora = lora_lib.param_count(adapters)
    from jalign.models import transformer as tfm

    assert tp.train_flops_per_token(m, 64, tfm.declare_params(m), adapters) == 4 * n + 6 * n_lora + attention


def test_start_line_names_parameters_source_mesh_and_memory(logged, capsys, tmp_path):
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", [*ARGS, f"train.out_dir={tmp_path}", "train.steps=1",
                                                       "train.eval_every=0", "train.tensorboard=false"])
    train(cfg)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("run: "))
    from jalign.models import transformer as tfm
    from jalign.models.lora import param_count

    n = param_count(tfm.declare_params(cfg.model))
    assert f"run: sft, {n / 1e3:.2f}K parameters ({n / 1e3:.2f}K trainable), weights random" in line
    assert "mesh data=8 fsdp=1 tensor=1 sequence=1 (8 cpu devices)" in line
    # params + two Adam moments of f32, replicated on every device (mesh.data only)
    assert f"train state {3 * 4 * n / 2**20:.1f} MiB" in line
    row = read_metrics(tmp_path)[0]
    assert row["model/params"] == row["model/trainable_params"] == n


def test_callbacks_see_every_step_and_evaluation(logged):
    rec, out, last = logged["rec"], logged["out"], logged["last"]
    steps = [c for c in rec.calls if c[0] == "step"]
    jsonl = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert [(s, loss) for _, s, loss in steps] == sorted(jsonl.items())
    assert rec.calls[0] == ("start", 0) and rec.calls[-1] == ("end", 4)
    evals = [c for c in rec.calls if c[0] == "eval"]
    assert [c[1] for c in evals] == [0, 2, 4] and "loss" in evals[0][2]
    # the hook's metric is logged with the evaluation and returned; at the end it is the final policy's norm
    from jalign.checkpoint import load_params

    final = float(optax.tree.norm(jax.device_get(load_params(out))))
    eval_rows = {r["step"]: r for r in read_metrics(out) if "eval/param_norm" in r}
    assert set(eval_rows) == {0, 2, 4}
    np.testing.assert_allclose(eval_rows[4]["eval/param_norm"], final, rtol=1e-6)
    assert last["eval/param_norm"] == eval_rows[4]["eval/param_norm"]


def test_request_stop_checkpoints_and_returns(tmp_path):
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", [*ARGS, f"train.out_dir={tmp_path}", "train.eval_every=0",
                                                       "train.checkpoint_every=0", "train.tensorboard=false"])
    rec = Recorder(stop_at=2)
    assert train(cfg, callbacks=[rec])["step"] == 2  # log_every=1: step 2 is read before step 3 is dispatched
    assert (tmp_path / "checkpoints" / "2").is_dir() and rec.calls[-1] == ("end", 2)
    assert train(cfg)["step"] == 4  # and the run resumes from there
