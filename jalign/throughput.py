"""Throughput figures of a run, from what the host already has: its batches and the model's declarations.

* ``tokens_per_s``: every token the model processed (non-padding positions of the batch rows, both sides of a
  pair); ``loss_tokens_per_s``: the tokens that carry loss (the algorithm's ``num_tokens``). RL batches are
  prompt indices: there both are the trained response tokens.
* ``mfu``: model FLOPs utilisation = tokens_per_s * training FLOPs per token / (peak FLOP/s per device * devices).
  FLOPs per token (Kaplan et al. 2020, arXiv:2001.08361, sec. 2.1; the attention term as in PaLM, Chowdhery et
  al. 2022, arXiv:2204.02311, app. B): ``6 N + 12 L H Q T`` with N the parameters of the matmuls (the embedding
  lookup is none; a tied LM head is), L layers, H heads of size Q and T the row length. Under LoRA the frozen
  base needs no weight gradient: ``4 N_base + 6 N_adapters``. The policy's forward and backward only (a live
  DPO reference or an RL rollout is not counted). The peak is ``train.peak_tflops`` or measured once per
  process with a matmul in the compute dtype on all devices at once.
* ``epoch``: training examples consumed / examples in the training data (all sources of a mixture).
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np


def count_all_tokens(batch) -> Optional[int]:
    """Non-padding positions (``segment_ids > 0``) of a host batch; None for batches without token rows."""
    if isinstance(batch, dict):
        if "segment_ids" in batch:
            return int(np.count_nonzero(np.asarray(batch["segment_ids"])))
        parts = [count_all_tokens(v) for v in batch.values() if isinstance(v, dict)]
        parts = [p for p in parts if p is not None]
        return sum(parts) if parts else None
    return None


def count_examples(batch) -> Optional[int]:
    """Training examples in a host batch: pairs / scored rows (``valid``), packed SFT rows (segments per row),
    prompts (``prompt_index``); None if unknown."""
    if not isinstance(batch, dict):
        return None
    if "valid" in batch:
        return int(np.asarray(batch["valid"]).sum())
    if "prompt_index" in batch:
        return int(np.asarray(batch["prompt_index"]).size)
    if "segment_ids" in batch:
        seg = np.asarray(batch["segment_ids"])
        return int(seg.reshape(seg.shape[0], -1).max(axis=1).sum())  # segments are numbered 1..k per row
    return None


def matmul_params(decls: dict, tie_embeddings: bool) -> int:
    """Parameters used in matrix multiplies: every leaf of rank >= 2 apart from its stacked ``layers`` axis (norm
    scales and biases are not), but the embedding table (a lookup), which counts when it is also the LM head."""
    from jalign.models import params as params_lib

    total = 0
    for path, d in params_lib.flatten_decls(decls).items():
        if sum(a != "layers" for a in d.axes) < 2:
            continue
        if path == "embed" and not tie_embeddings:
            continue
        total += int(np.prod(d.shape, dtype=np.int64))
    return total


def train_flops_per_token(model_cfg, seq_len: int, decls: Optional[dict] = None,
                          trained_decls: Optional[dict] = None) -> float:
    """``6 N + 12 L H Q T`` (see the module docstring); with ``trained_decls`` (LoRA adapters) the base ``decls``
    count ``4 N`` and the trained ones ``6 N``."""
    from jalign.models import transformer as tfm

    decls = decls if decls is not None else tfm.declare_params(model_cfg)
    n = matmul_params(decls, model_cfg.tie_embeddings)
    m = model_cfg
    attention = 12.0 * m.layers * m.heads * m.resolved_head_dim * seq_len
    if trained_decls is None:
        return 6.0 * n + attention
    return 4.0 * n + 6.0 * matmul_params(trained_decls, True) + attention


_PEAK: dict = {}


def measured_peak_flops(dtype: str = "float32") -> float:
    """FLOP/s per device of a large matmul run on every device at once (cached per process and dtype)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    devices = jax.devices()
    key = (devices[0].platform, len(devices), dtype)
    if key in _PEAK:
        return _PEAK[key]
    n = 256 if devices[0].platform == "cpu" else 4096
    reps = 4
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    sharding = NamedSharding(mesh, PartitionSpec("d"))
    x = jax.device_put(jnp.ones((len(devices), n, n), dtype), sharding)

    @jax.jit
    def chain(a):
        def body(_, b):
            return jnp.einsum("bij,bjk->bik", b, a) * (1.0 / n)
        return jax.lax.fori_loop(0, reps, body, a)

    chain(x).block_until_ready()  # compile
    start = time.perf_counter()
    chain(x).block_until_ready()
    seconds = max(time.perf_counter() - start, 1e-9)
    _PEAK[key] = 2.0 * n ** 3 * reps / seconds
    return _PEAK[key]


def train_size(algo) -> Optional[int]:
    """Examples in the training data of an algorithm (its data pipeline's records, or its prompts)."""
    data = getattr(algo, "data", None)
    records = getattr(data, "train_records", None)
    if records is not None:
        return len(records)
    prompts = getattr(algo, "train_prompts", None)
    return len(prompts) if prompts is not None else None


# metrics that measure the wall clock (they differ between runs that are otherwise bitwise equal)
WALL_CLOCK_METRICS = ("tokens_per_s", "loss_tokens_per_s", "mfu")

class Throughput:
    """Counts of the batches consumed since the last log step -> the figures of the module docstring."""

    def __init__(self, *, flops_per_token: Optional[float], peak_flops: Optional[float], num_devices: int,
                 dataset_size: Optional[int], process_count: int = 1):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.num_devices, self.dataset_size, self.process_count = num_devices, dataset_size, process_count
        self.window_all, self.window_loss, self.window_start = 0, 0.0, time.time()
        self.all_known = True
        self.examples, self.batches = 0, 0

    def saw(self, batch) -> None:
        """A host batch was consumed (called before its step is dispatched)."""
        n = count_all_tokens(batch)
        self.all_known = self.all_known and n is not None
        self.window_all += n or 0
        e = count_examples(batch)
        if e is not None:
            self.examples += e
            self.batches += 1

    def read(self, metrics: dict) -> None:
        """A step's metrics were read (its loss tokens)."""
        self.window_loss += float(metrics.get("num_tokens", 0.0))

    def figures(self, step: int) -> dict:
        """The window's rates (and the window restarts), MFU and epoch at ``step``."""
        elapsed = max(time.time() - self.window_start, 1e-9)
        all_tokens = self._global(self.window_all) if self.all_known else None
        out = {"loss_tokens_per_s": self.window_loss / elapsed}
        out["tokens_per_s"] = all_tokens / elapsed if all_tokens is not None else out["loss_tokens_per_s"]
        if all_tokens is not None and self.flops_per_token and self.peak_flops:
            out["mfu"] = out["tokens_per_s"] * self.flops_per_token / (self.peak_flops * self.num_devices)
        if self.dataset_size and self.batches:
            # per-process mean examples per step, times processes, times steps: right after a resume too
            out["epoch"] = step * self.examples / self.batches * self.process_count / self.dataset_size
        self.window_all, self.window_loss, self.window_start = 0, 0.0, time.time()
        return out

    def _global(self, local: int) -> int:
        if self.process_count == 1:
            return local
        import jax.numpy as jnp
        from jax.experimental import multihost_utils

        return int(np.asarray(multihost_utils.process_allgather(jnp.asarray(local))).sum())
