"""The workloads `compare.py` runs side by side: one definition of shapes, data and optimizer, built in jalign
or in a plain PyTorch/transformers loop, each as a persistent worker process.

    python benchmarks/_workloads.py --side jalign|jalign-engine|torch --workload sft|dpo|decode --model-dir DIR

The worker builds its program, runs one step (compile / warm-up; the time is reported), prints
``ready {...}`` and then serves ``run K`` lines (K steps; prints ``done {"wall": s, "cpu": s, "loss": x}``)
until ``quit``. Alternating the two workers' rounds from one coordinator keeps them from competing for the
cores. ``cpu`` is the process's user + system time over the K steps (all threads): on a shared machine it
is steadier than wall time.

Workloads (tiny-llama: vocab 8192, hidden 256, mlp 688, 4 layers, 8/4 heads, f32; the same weights on both
sides, written once by the coordinator with ``save_hf``):

* sft: 8 rows x 256 tokens, every target a loss token, token-mean NLL, AdamW (lr 1e-3, betas 0.9/0.95,
  eps 1e-8, weight decay 0.01, global-norm clip 1.0, warmup 20 + cosine) -- jalign's OptimConfig defaults.
* dpo: 8 pairs x (64 prompt + 192 response), live reference (forward only), sigmoid DPO beta 0.1, same AdamW.
* decode: greedy, batch 8, prompt 64, exactly 192 new tokens (EOS off).

Sides: ``jalign`` (one CPU device: XLA:CPU spreads each op over the cores), ``jalign-dp`` (one CPU device per
core, ``--xla_force_host_platform_device_count``, the batch data-parallel over them: each device runs its
half of the batch's ops concurrently, gradients all-reduced), ``jalign-engine`` (decode), ``torch``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

MODEL = dict(vocab_size=8192, hidden=256, mlp=688, layers=4, heads=8, kv_heads=4)
SFT = dict(rows=8, seq=256)
DPO = dict(pairs=8, prompt=64, response=192, beta=0.1)
DECODE = dict(batch=8, prompt=64, new=192)
OPTIM = dict(lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, clip=1.0, warmup=20, steps=100, min_ratio=0.1)


def matmul_params() -> int:
    """Weights that take part in a matmul per token: q, k, v, o and the gated MLP of every layer, plus the
    untied [hidden, vocab] head (the embedding lookup is a gather, not a matmul)."""
    h, hd = MODEL["hidden"], MODEL["hidden"] // MODEL["heads"]
    attn = h * hd * (2 * MODEL["heads"] + 2 * MODEL["kv_heads"])
    return MODEL["layers"] * (attn + 3 * h * MODEL["mlp"]) + h * MODEL["vocab_size"]


def forward_flops_per_token(seq: int) -> float:
    """2 N for the matmuls plus causal attention (q k^T and p v: 2 x 2 flops x hd x heads over seq / 2 keys)."""
    hd = MODEL["hidden"] // MODEL["heads"]
    return 2 * matmul_params() + 2 * MODEL["layers"] * MODEL["heads"] * hd * seq


def step_flops(workload: str) -> float:
    """Model FLOPs of one step (backward = 2 x forward, as in the PaLM MFU accounting; no recomputation)."""
    if workload == "sft":
        T = SFT["seq"]
        return 3 * forward_flops_per_token(T) * SFT["rows"] * T
    if workload == "dpo":
        T = DPO["prompt"] + DPO["response"]
        return (3 + 1) * forward_flops_per_token(T) * 2 * DPO["pairs"] * T  # policy fwd+bwd, reference fwd
    return 0.0


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- the data (numpy, identical on every side) ----------------------------------------------------
def sft_data(seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    B, T = SFT["rows"], SFT["seq"]
    ids = rng.integers(3, MODEL["vocab_size"], (B, T + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:], np.ones((B, T), np.float32)


def dpo_data(seed: int = 0):
    """tokens/targets/loss_mask [pairs, 2, T] (side 0 chosen): targets from the first response token on."""
    import numpy as np

    P, R = DPO["prompt"], DPO["response"]
    T = P + R
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, MODEL["vocab_size"], (DPO["pairs"], 2, T + 1)).astype(np.int32)
    ids[:, 1, :P] = ids[:, 0, :P]  # one prompt per pair
    mask = np.zeros((DPO["pairs"], 2, T), np.float32)
    mask[..., P - 1:] = 1.0
    return ids[..., :-1], ids[..., 1:], mask


def decode_prompts(seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, MODEL["vocab_size"], (DECODE["batch"], DECODE["prompt"])).tolist()


# ---- jalign ---------------------------------------------------------------------------------------
def jalign_model(model_dir: str, dtype: str = "float32"):
    import jax

    import dataclasses

    from jalign.models.hf_io import load_hf_params, model_config_from_hf

    cfg = dataclasses.replace(model_config_from_hf(model_dir), dtype=dtype)
    return load_hf_params(model_dir, cfg), cfg


def jalign_sft(model_dir: str, devices: int = 1):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jalign.algorithms import base
    from jalign.config import OptimConfig
    from jalign.data.fields import SFT_FIELDS
    from jalign.losses import sft_loss
    from jalign.models import transformer as tfm
    from jalign.state import TrainedModel
    from sharding import make_mesh, make_rules, use_rules

    params, cfg = jalign_model(model_dir)
    mesh, rules = make_mesh(devices, 1, 1, 1, devices=jax.devices()[:devices]), make_rules()
    trained = TrainedModel(tfm.declare_params(cfg), OptimConfig(), OPTIM["steps"], mesh, rules, jnp.float32)

    def loss_fn(p, mb, norms, roles):
        loss, m = sft_loss(base.policy_token_logps(p, mb, cfg), mb["loss_mask"], norms["num_tokens"])
        return loss, {"loss": loss, "num_tokens": m["num_tokens"]}

    tokens, targets, mask = sft_data()
    B, T = tokens.shape
    rows = dict(tokens=tokens, targets=targets, loss_mask=mask, segment_ids=np.ones((B, T), np.int32),
                positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy())
    ctx = use_rules(mesh, rules)
    ctx.__enter__()
    state = trained.new_state(jax.device_put(params, trained.param_shardings), jax.random.key(0))
    step = base.make_train_step(loss_fn, lambda b: {"num_tokens": jnp.sum(b["loss_mask"])}, trained)
    box = {"state": state, "ctx": ctx}  # the mesh context stays entered while the worker lives

    def run():
        box["state"], m = step(box["state"], None, base.to_global_batch(rows, SFT_FIELDS, mesh, rules, 1))
        return float(m["loss"])  # a host sync per step, like loss.item() in the torch loop

    return run


def jalign_dpo(model_dir: str, devices: int = 1):
    import pathlib
    import tempfile

    import jax
    import numpy as np

    from jalign.algorithms import base
    from jalign.algorithms.dpo import DPO as DPOAlgo
    from jalign.config import load_config
    from jalign.roles import build_roles
    from sharding import make_mesh, make_rules, use_rules

    T = DPO["prompt"] + DPO["response"]
    run_dir = tempfile.mkdtemp(prefix="jalign_cmp_dpo_")
    cfg = load_config(None, [f"model.hf_path={model_dir}", "model.dtype=float32", "model.param_dtype=float32",
                             *(f"model.{k}={v}" for k, v in MODEL.items()),
                             "algorithm.name=dpo", "algorithm.reference=live", f"algorithm.beta={DPO['beta']}",
                             "eval.prompts=0", "data.train=builtin:addition_pairs:train:64", "data.eval=null",
                             f"data.seq_len={T}", f"train.global_batch={DPO['pairs']}", f"train.steps={OPTIM['steps']}",
                             f"train.out_dir={run_dir}", f"mesh.data={devices}"])
    mesh = make_mesh(devices, 1, 1, 1, devices=jax.devices()[:devices])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=pathlib.Path(run_dir), log=lambda *_: None)
    tokens, targets, mask = dpo_data()
    n = DPO["pairs"]
    batch = {"tokens": tokens, "targets": targets, "loss_mask": mask,
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (n, 2, T)).copy(),
             "segment_ids": np.ones((n, 2, T), np.int32), "index": np.arange(n, dtype=np.int32),
             "valid": np.ones(n, np.float32), "rewards": np.tile(np.asarray([[1.0, 0.0]], np.float32), (n, 1))}
    ctx = use_rules(mesh, rt.rules)
    ctx.__enter__()
    algo = DPOAlgo(rt)
    roles = build_roles(cfg, algo.role_specs(), mesh, rt.rules, log=lambda *_: None)
    box = {"state": algo.init_state(roles), "ctx": ctx}

    def run():
        box["state"], m = algo.step(box["state"], roles, batch)
        return float(m["loss"])

    return run


def jalign_decode(model_dir: str, engine: bool = False):
    params, cfg = jalign_model(model_dir)
    prompts = decode_prompts()
    kw = dict(max_new_tokens=DECODE["new"], greedy=True, rng=0)
    if engine:
        from jalign import rollout

        def run():
            out = rollout.generate(params, cfg, prompts, slots=len(prompts), **kw)
            return float(out["tokens"][0, -1])
    else:
        from jalign import generate as gen

        bucket = 1 << (DECODE["new"] - 1).bit_length()

        def run():
            out = gen.generate(params, cfg, prompts, new_bucket=bucket, **kw)
            return float(out["tokens"][0, -1])
    return run


# ---- plain PyTorch / transformers -----------------------------------------------------------------
def torch_model(model_dir: str):
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def torch_optimizer(model):
    """AdamW + global-norm clipping + linear warmup then cosine to min_ratio (jalign's OptimConfig schedule)."""
    import math

    import torch

    o = OPTIM
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
                            lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"])

    def lr_at(step):
        if step < o["warmup"]:
            return step / o["warmup"]
        t = min(1.0, (step - o["warmup"]) / max(1, o["steps"] - o["warmup"]))
        return o["min_ratio"] + (1 - o["min_ratio"]) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    def update(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip"])
        opt.step()
        sched.step()

    return update


def token_logps_torch(model, tokens, targets):
    import torch

    logits = model(input_ids=tokens).logits.float()
    return torch.gather(torch.log_softmax(logits, -1), -1, targets[..., None])[..., 0]


def torch_sft(model_dir: str):
    import torch

    model = torch_model(model_dir).train()
    update = torch_optimizer(model)
    tokens, targets, mask = (torch.from_numpy(x) for x in sft_data())
    tokens, targets = tokens.long(), targets.long()

    def run():
        lp = token_logps_torch(model, tokens, targets)
        loss = -(lp * mask).sum() / mask.sum()
        update(loss)
        return float(loss.item())

    return run


def torch_dpo(model_dir: str):
    import torch
    import torch.nn.functional as F

    model = torch_model(model_dir).train()
    ref = torch_model(model_dir).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    update = torch_optimizer(model)
    tokens, targets, mask = (torch.from_numpy(x) for x in dpo_data())
    n, _, T = tokens.shape
    tokens, targets, mask = tokens.reshape(2 * n, T).long(), targets.reshape(2 * n, T).long(), mask.reshape(2 * n, T)

    def run():
        with torch.no_grad():
            ref_sums = (token_logps_torch(ref, tokens, targets) * mask).sum(-1).view(n, 2)
        sums = (token_logps_torch(model, tokens, targets) * mask).sum(-1).view(n, 2)
        logits = DPO["beta"] * ((sums[:, 0] - ref_sums[:, 0]) - (sums[:, 1] - ref_sums[:, 1]))
        loss = -F.logsigmoid(logits).mean()
        update(loss)
        return float(loss.item())

    return run


def torch_decode(model_dir: str):
    import torch

    model = torch_model(model_dir).eval()
    ids = torch.tensor(decode_prompts())

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE["new"],
                                 min_new_tokens=DECODE["new"], do_sample=False, pad_token_id=0, eos_token_id=None)
        return float(out[0, -1])

    return run


def host_devices() -> int:
    """CPU devices for the data-parallel jalign side: one per core (``--xla_force_host_platform_device_count``;
    the batch of 8 rows / pairs must divide by it)."""
    n = os.cpu_count() or 1
    while n > 1 and 8 % n:
        n -= 1
    return n


# ---- the worker loop ------------------------------------------------------------------------------
def serve(run, first_step_s: float) -> None:
    print("ready " + json.dumps({"first_step_s": first_step_s}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            return
        k = int(cmd[1])
        t, c = time.perf_counter(), cpu_seconds()
        loss = None
        for _ in range(k):
            loss = run()
        print("done " + json.dumps({"wall": time.perf_counter() - t, "cpu": cpu_seconds() - c, "loss": loss}),
              flush=True)


BUILDERS = {("jalign", "sft"): jalign_sft, ("jalign", "dpo"): jalign_dpo, ("jalign", "decode"): jalign_decode,
            ("jalign-engine", "decode"): lambda d: jalign_decode(d, engine=True),
            ("jalign-dp", "sft"): lambda d: jalign_sft(d, devices=host_devices()),
            ("jalign-dp", "dpo"): lambda d: jalign_dpo(d, devices=host_devices()),
            ("torch", "sft"): torch_sft, ("torch", "dpo"): torch_dpo, ("torch", "decode"): torch_decode}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--model-dir", required=True)
    a = ap.parse_args()
    if a.side.startswith("jalign"):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if a.side == "jalign-dp":  # before jax is imported (the builders import it)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={host_devices()}")
    t = time.perf_counter()
    run = BUILDERS[(a.side, a.workload)](a.model_dir)
    run()
    serve(run, time.perf_counter() - t)


if __name__ == "__main__":
    main()
