"""Several JAX processes on one machine (launch/local.sh, gloo collectives on CPU).

The real runs: 2 processes x 4 simulated CPU devices train the tiny SFT model on a (data=4, fsdp=2) mesh
and must match one process with 8 devices to 1e-5, checkpoints resume across 2 <-> 1 processes, every
example is fed exactly once, and a dead or hung peer makes the survivor exit non-zero in bounded time.
Unpacked rows (data.packing=false) make the global batch of a step the same set of examples whatever
the process count (see jalign.data.pipeline: shuffle, then slice by process).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jalign.config import ConfigError, DistributedConfig, load_config
from jalign.metrics import read_metrics

ROOT = Path(__file__).parent.parent
LOCAL = ROOT / "launch/local.sh"
WORKER = f"{sys.executable} {ROOT / 'tests/multihost_worker.py'}"
TINY = [
    "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4", "model.kv_heads=2",
    "data.seq_len=32", "data.packing=false", "train.global_batch=16", "train.micro_batch=8",
    "train.log_every=1", "train.progress=false", "train.tensorboard=false", "mesh.data=4", "mesh.fsdp=2",
    "train.steps=4", "train.checkpoint_every=2", "train.eval_every=4", "train.eval_batches=1",
    "eval.prompts=2", "eval.max_new_tokens=2",
]
# The flags conftest gives this process (minus its device count), so compiled programs match.
XLA_BASE = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)


# ---- layout resolution (no processes) -----------------------------------------------------------
def test_layout_from_config_then_jalign_env_then_jax_env(monkeypatch):
    from jalign.distributed import resolve

    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "JALIGN_", "JAX_COORD", "JAX_NUM", "JAX_PROCESS")):
            monkeypatch.delenv(k)
    assert resolve(DistributedConfig()) is None  # nothing set: one process, no-op
    env = {"JALIGN_COORDINATOR": "h:1", "JALIGN_NUM_PROCESSES": "4", "JALIGN_PROCESS_ID": "2",
           "JAX_COORDINATOR_ADDRESS": "other:2", "JAX_PROCESS_ID": "3"}
    lay = resolve(DistributedConfig(), env)
    assert (lay.coordinator_address, lay.num_processes, lay.process_id, lay.cluster) == ("h:1", 4, 2, None)
    lay = resolve(DistributedConfig(process_id=1), {"JAX_COORDINATOR_ADDRESS": "j:3", "JAX_NUM_PROCESSES": "2"})
    assert (lay.coordinator_address, lay.num_processes, lay.process_id) == ("j:3", 2, 1)
    assert resolve(DistributedConfig(num_processes=1, process_id=0), env) is None
    with pytest.raises(ConfigError, match=r"process_id 5 is not in \[0, 4\)"):
        resolve(DistributedConfig(process_id=5), env)
    with pytest.raises(ConfigError, match="num_processes missing"):
        resolve(DistributedConfig(cluster_detection="off"), {"JALIGN_COORDINATOR": "h:1", "JALIGN_PROCESS_ID": "0"})
    with pytest.raises(ConfigError, match="heartbeat_timeout"):
        resolve(DistributedConfig(heartbeat_timeout=0), env)
    # SLURM (jax's own detection): srun with 2 tasks is a layout, a single-task allocation is not.
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    lay = resolve(DistributedConfig(), {})
    assert lay.cluster == "slurm" and lay.coordinator_address is None
    assert resolve(DistributedConfig(cluster_detection="off"), {}) is None
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert resolve(DistributedConfig(), {}) is None


# ---- data: exactly once, and iterator states across process counts ------------------------------
def _records(n):
    # Example i: tokens [i+1, 1000+i, ...]; distinct lengths so packing mixes several per row.
    out = []
    for i in range(n):
        k = 3 + i % 5
        toks = [i + 1] + [1000 + i] * (k - 1)
        rec = {"tokens": toks, "targets": toks[1:] + [0], "loss_mask": [0.0] + [1.0] * (k - 1),
               "positions": list(range(k)), "segment_ids": [1] * k}
        out.append({key: np.asarray(v, np.float32 if key == "loss_mask" else np.int32) for key, v in rec.items()})
    return out


def _example_ids(batch):
    """The examples in a batch: the first token of every segment."""
    ids = []
    for toks, seg in zip(batch["tokens"], batch["segment_ids"]):
        starts = np.flatnonzero((seg > 0) & (np.concatenate([[0], seg[:-1]]) != seg))
        ids += [int(toks[s]) - 1 for s in starts]
    return ids


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_each_example_once_per_epoch_across_processes(count, packing):
    from jalign.data.pipeline import make_sft_iterator

    recs = _records(60)
    seen = Counter()
    for p in range(count):
        it = make_sft_iterator(recs, seq_len=16, batch_rows_per_process=2, packing=packing, shuffle=True,
                               seed=3, process_index=p, process_count=count, repeat=False)
        for batch in it:
            seen.update(_example_ids(batch))
        # what drop_remainder left out of this process's last batch is at most one batch
    assert max(seen.values()) == 1
    assert len(seen) >= 60 - count * (2 * (8 if packing else 1))


def test_iterator_state_converts_between_process_counts():
    from jalign.checkpoint import reshard_iterator_state
    from jalign.data.pipeline import make_sft_iterator

    recs = _records(48)

    def iterators(count, rows):
        return [make_sft_iterator(recs, seq_len=16, batch_rows_per_process=rows, packing=False, shuffle=True,
                                  seed=1, process_index=p, process_count=count) for p in range(count)]

    two = iterators(2, 4)
    for _ in range(3):  # 3 steps of a global batch of 8 rows
        for it in two:
            next(it)
    states = [it.get_state() for it in two]
    one = iterators(1, 8)[0]
    one.set_state(reshard_iterator_state(states, 0, 1))
    for _ in range(4):  # the following global batches are the same sets of examples
        assert sorted(_example_ids(next(one))) == sorted(sum((_example_ids(next(it)) for it in two), []))
    assert reshard_iterator_state([{"next_index": 3}], 0, 2) is None  # 3 examples cannot be split in 2
    assert reshard_iterator_state([{"next_index": 4}, {"next_index": 5}], 0, 1) is None
    assert reshard_iterator_state([{"packing": 1}], 0, 2) is None


# ---- real multi-process runs -------------------------------------------------------------------
def _env(**extra):
    env = dict(os.environ, XLA_FLAGS=XLA_BASE, DEVICES_PER_PROCESS="4", JALIGN_CMD=WORKER, GRACE="5",
               PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launch(n, run_dir, record, *overrides):
    """launch/local.sh n ... with the recording worker; output goes to <record>/launcher.log."""
    record.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["bash", str(LOCAL), str(n), str(ROOT / "configs/sft_tiny.yaml"), *TINY,
                             f"train.out_dir={run_dir}", *overrides], env=_env(JALIGN_TEST_RECORD=record),
                            stdout=open(record / "launcher.log", "wb"), stderr=subprocess.STDOUT)
    proc.log = record / "launcher.log"
    return proc


def _finish(proc, timeout=400, ok=True):
    proc.wait(timeout=timeout)
    out = proc.log.read_text(errors="replace")
    if ok:
        assert proc.returncode == 0, out[-6000:]
    return out


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _eval(run_dir):
    return {k: v for r in read_metrics(run_dir) for k, v in r.items() if k.startswith("eval/")}


def _steps_rows(record, processes):
    """{step: Counter of example rows (as bytes)} over all processes' recorded host batches."""
    out = {}
    for p in range(processes):
        data = np.load(record / f"batches_{p}.npz")
        for key in data.files:
            if key.startswith("tokens_"):
                step = int(key.split("_")[1])
                out.setdefault(step, Counter()).update(row.tobytes() for row in data[key])
    return out


def _record_in_process(monkeypatch, record):
    import jax

    from jalign.algorithms import sft

    record.mkdir(parents=True, exist_ok=True)
    original = getattr(sft.SFT.step, "unpatched", sft.SFT.step)
    steps = []

    def step(self, state, roles, batch):
        steps.append(np.asarray(batch["tokens"]))
        np.savez(record / f"batches_{jax.process_index()}.npz", **{f"tokens_{i}": t for i, t in enumerate(steps)})
        return original(self, state, roles, batch)

    step.unpatched = original
    monkeypatch.setattr(sft.SFT, "step", step)
    return steps


def _copy_run(src, dst, keep_step):
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) != keep_step:
            shutil.rmtree(d)
    (dst / "metrics.jsonl").unlink()


def test_two_processes_match_one_and_checkpoints_cross_over(tmp_path, monkeypatch):
    from jalign.trainer import train

    t0 = time.time()
    two = tmp_path / "two"
    # 2 processes, 4 steps (checkpoints at 2 and 4, eval + HF export at 4), while this process runs
    # the first 2 steps of the same training with 8 devices.
    proc = _launch(2, two, tmp_path / "rec_two", f"train.export_hf={tmp_path / 'hf_two'}")
    one = tmp_path / "one"
    _record_in_process(monkeypatch, tmp_path / "rec_one")
    train(load_config(ROOT / "configs/sft_tiny.yaml", TINY + [f"train.out_dir={one}", "train.stop_after_steps=2"]))
    out = _finish(proc)
    a, b = _losses(two), _losses(one)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2]
    np.testing.assert_allclose([a[1], a[2]], [b[1], b[2]], rtol=0, atol=1e-5)
    assert out.count("jax.distributed initialised: process") == 2
    # Each step's global batch: the processes' rows together are exactly the single process's rows.
    rows_two = _steps_rows(tmp_path / "rec_two", 2)
    rows_one = _steps_rows(tmp_path / "rec_one", 1)
    for s in (0, 1):
        assert rows_two[s] == rows_one[s]
    # One writer: config, metrics and the export exist once, written by process 0.
    rows = [r for r in read_metrics(two) if "model/params" not in r]  # without the start-of-run row
    assert (two / "config.yaml").exists() and len(rows) == 4 + 2  # 4 steps + eval rows at 0 and 4
    assert (tmp_path / "hf_two" / "config.json").exists()
    assert list((tmp_path / "hf_two").glob("*.safetensors"))

    # 2 -> 1: resume the 2-process checkpoint of step 2 in this process (8 devices) ...
    resumed_one = tmp_path / "resumed_one"
    _copy_run(two, resumed_one, 2)
    # ... while 2 processes resume the 1-process checkpoint of step 2 (1 -> 2).
    resumed_two = tmp_path / "resumed_two"
    _copy_run(one, resumed_two, 2)
    proc = _launch(2, resumed_two, tmp_path / "rec_resumed_two")
    _record_in_process(monkeypatch, tmp_path / "rec_resumed_one")
    train(load_config(ROOT / "configs/sft_tiny.yaml", TINY + [f"train.out_dir={resumed_one}"]))
    _finish(proc)
    c, d = _losses(resumed_one), _losses(resumed_two)
    assert sorted(c) == sorted(d) == [3, 4]
    np.testing.assert_allclose([c[3], c[4]], [a[3], a[4]], rtol=0, atol=1e-5)
    np.testing.assert_allclose([d[3], d[4]], [a[3], a[4]], rtol=0, atol=1e-5)
    # The converted data positions continue with exactly the examples the 2-process run saw next.
    rows_resumed = _steps_rows(tmp_path / "rec_resumed_one", 1)
    assert rows_resumed[0] == rows_two[2] and rows_resumed[1] == rows_two[3]
    # Evaluation (eval loss over process-sharded eval batches, greedy exact match) agrees too.
    ev2, ev1, ev3 = _eval(two), _eval(resumed_one), _eval(resumed_two)
    assert set(ev2) == set(ev1) and {"eval/loss", "eval/exact_match", "eval/greedy_response_length"} <= set(ev2)
    for k in ev2:
        assert abs(ev2[k] - ev1[k]) < 1e-5 and abs(ev3[k] - ev1[k]) < 1e-5, (k, ev1, ev2, ev3)
    # load_params reads the 2-process checkpoint in one process.
    import jax

    from jalign.checkpoint import load_params

    p2, p1 = jax.device_get(load_params(two)), jax.device_get(load_params(resumed_one))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), p2, p1)
    print(f"2-process equivalence + checkpoint crossover: {time.time() - t0:.0f} s")


def test_coordinator_unreachable_fails_with_a_clear_error(tmp_path):
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "jalign", "train", str(ROOT / "configs/sft_tiny.yaml"), *TINY,
         f"train.out_dir={tmp_path}", "distributed.initialization_timeout=3"],
        env=_env(JAX_PLATFORMS="cpu", JALIGN_COORDINATOR=f"127.0.0.1:{_free_port()}", JALIGN_NUM_PROCESSES=2,
                 JALIGN_PROCESS_ID=1), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "cannot reach the coordinator 127.0.0.1:" in proc.stderr
    assert "initialization_timeout=3" in proc.stderr
    assert time.time() - t0 < 60


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_steps(run_dir, n, procs, deadline):
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(_losses(run_dir)) >= n:
            return
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"a process ended early with status {p.returncode}")
        time.sleep(0.3)
    pytest.fail("training did not start in time")


def test_dead_or_hung_peer_stops_the_survivor(tmp_path):
    """SIGKILL of process 1 under local.sh: the survivor and the launcher exit non-zero at once.
    SIGSTOP of process 1 (hung, its sockets stay open): the coordinator misses its heartbeats and the
    survivor is terminated within distributed.heartbeat_timeout."""
    long = ["train.steps=100000", "train.checkpoint_every=0", "train.eval_every=0",
            "distributed.heartbeat_timeout=10", "distributed.shutdown_timeout=10"]
    # (a) under local.sh
    killed = tmp_path / "killed"
    launcher = _launch(2, killed, tmp_path / "rec_killed", *long)
    # (b) a hand-made pair, to watch the survivor itself
    port, hung = _free_port(), tmp_path / "hung"
    pair = [subprocess.Popen(
        [sys.executable, "-m", "jalign", "train", str(ROOT / "configs/sft_tiny.yaml"), *TINY, *long,
         f"train.out_dir={hung}"],
        env=_env(JAX_PLATFORMS="cpu", XLA_FLAGS=f"{XLA_BASE} --xla_force_host_platform_device_count=4",
                 JALIGN_COORDINATOR=f"127.0.0.1:{port}", JALIGN_NUM_PROCESSES=2, JALIGN_PROCESS_ID=i),
        stdout=open(tmp_path / f"hung_{i}.log", "wb"), stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline = time.time() + 300
        _wait_for_steps(killed, 2, [launcher], deadline)
        victim = int((tmp_path / "rec_killed" / "pid_1").read_text())
        survivor = int((tmp_path / "rec_killed" / "pid_0").read_text())
        os.kill(victim, signal.SIGKILL)
        t = time.time()
        out = _finish(launcher, timeout=60, ok=False)
        assert launcher.returncode != 0, out[-3000:]
        assert time.time() - t < 30
        assert "process 1 (pid" in out and "exited with status" in out
        with pytest.raises(ProcessLookupError):
            os.kill(survivor, 0)

        _wait_for_steps(hung, 2, pair, deadline)
        os.kill(pair[1].pid, signal.SIGSTOP)
        t = time.time()
        pair[0].wait(timeout=60)
        err = (tmp_path / "hung_0.log").read_text(errors="replace")
        assert pair[0].returncode != 0
        assert time.time() - t < 30
        assert "stopped sending heartbeats" in err or "Gloo" in err, err[-3000:]
    finally:
        for p in [launcher, *pair]:
            if p.poll() is None:
                if p is pair[1]:
                    os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
