"""How often a run compiles its programs, counted in-process through ``jax.monitoring``.

A 3-step SFT run with an evaluation at step 0 and at step 3 compiles its train step, its eval step and the
generation engine's decode once each: the steps and the second evaluation reuse the executables of the first
(no shape, dtype, sharding or static argument changes between calls). The event fires on every in-memory jit
cache miss, whether XLA then compiles or loads the program from the persistent cache the tests use.
"""
from collections import Counter
from pathlib import Path

from jax._src import monitoring

from jalign.config import load_config
from jalign.trainer import train

ROOT = Path(__file__).parent.parent
SMALL = ["model.layers=2", "model.hidden=64", "model.mlp=192", "data.seq_len=32", "train.global_batch=16",
         "eval.prompts=16"]


def _compiles(fn) -> Counter:
    names = Counter()

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            names[str(kw.get("fun_name"))] += 1

    monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        monitoring.unregister_event_duration_listener(listener)
    return names


def test_a_3_step_sft_run_compiles_each_program_once(tmp_path):
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", [
        f"train.out_dir={tmp_path}", "train.steps=3", "train.log_every=1", "train.eval_every=3",
        "train.checkpoint_every=3", "train.eval_batches=2", "train.progress=false", "train.tensorboard=false",
        *SMALL])
    assert cfg.eval.at_start
    n = _compiles(lambda: train(cfg))
    assert n["jit(step)"] == 1, n
    assert n["jit(_eval_sums)"] == 1, n  # two evaluations, one program
    assert n["jit(_decode_impl)"] == 1, n  # the generation-based evaluation's decode loop, twice
    assert n["jit(_refill_impl)"] >= 1, n  # (the refill compiles once per prefill-row bucket: not pinned here)
