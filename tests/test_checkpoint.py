"""Checkpoints under damage and full disks: fall back to the newest loadable step with a message naming
the damage, one CheckpointWriteError when a save fails (the previous step still restores), checksums
exact across shardings, and check_resume_config naming the changed keys."""
import errno
import glob
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.checkpoint import (CheckpointError, CheckpointMismatch, Checkpointer, CheckpointWriteError, checksums,
                               load_params)
from jalign.config import ConfigError, dump_config, load_config, to_dict
from jalign.resume import check_resume_config

ROOT = Path(__file__).parent.parent


class Iterator:
    """The part of a grain iterator the checkpointer uses."""

    def __init__(self, position=0):
        self.position = position

    def get_state(self):
        return {"next_index": self.position}

    def set_state(self, state):
        self.position = state["next_index"]


def make_state(step: int, n: int = 96):
    key = jax.random.key(step)
    return {"params": {"w": jax.random.normal(key, (n, n)), "b": jnp.arange(8.0) + step,
                       "emb": jax.random.normal(jax.random.fold_in(key, 1), (16, n)).astype(jnp.bfloat16)},
            "opt": {"mu": jnp.full((n,), 0.5 * step), "count": jnp.int32(step)},
            "step": jnp.int32(step)}


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A checkpoint directory with steps 1 and 2 (async saves), iterator positions 10 and 20."""
    d = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    c = Checkpointer(d, keep=3, async_save=True)
    for step in (1, 2):
        c.check()
        c.save(step, make_state(step), Iterator(10 * step), meta={"step": step}, force=True)
    c.wait()
    c.close()
    return d


def copy_of(src, tmp_path):
    dst = tmp_path / "checkpoints"
    shutil.copytree(src, dst)
    return dst


def _truncate(pattern):
    def f(step_dir):
        for p in glob.glob(str(step_dir / pattern), recursive=True):
            with open(p, "r+b") as fh:
                fh.truncate(max(os.path.getsize(p) // 2, 1))
    return f


def _corrupt_largest_array_file(step_dir):
    # the bytes of the (random, incompressible) arrays: no reader notices, only the checksums do
    p = max(glob.glob(str(step_dir / "state/**/d/*"), recursive=True), key=os.path.getsize)
    data = bytearray(Path(p).read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0x55
    Path(p).write_bytes(bytes(data))


def _write(rel, text):
    return lambda step_dir: (step_dir / rel).write_text(text)


def _remove(rel):
    def f(step_dir):
        p = step_dir / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return f


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


# damage -> (what the message says, whether load_params of that step fails too)
DAMAGE = {
    "garbled state/_METADATA": (_write("state/_METADATA", "{not json"), r"state/_METADATA is not valid JSON", True),
    "truncated array files": (_truncate("state/**/d/*"), r"the state cannot be read \(ValueError: .*Error reading", True),
    "corrupt array bytes": (_corrupt_largest_array_file, r"corrupt array data: params/w do not match the checksums",
                            True),
    "truncated manifest": (_truncate("state/manifest.ocdbt"), r"the state cannot be read \(ValueError: DATA_LOSS", True),
    "empty step directory": (_empty, r"empty step directory \(no state, meta or data item\)", True),
    "missing state item": (_remove("state"), r"item 'state' is missing", True),
    "missing meta item": (_remove("meta"), r"item 'meta' is missing", False),
    "garbled meta item": (_write("meta/metadata", "{x"), r"meta/metadata is not valid JSON", False),
    "missing data item": (_remove("data"), r"item 'data' \(the data-iterator position\) is missing", False),
    "missing data-iterator file": (_remove("data/process_0-of-1.json"),
                                   r"item 'data' has no data-iterator file \(process_\*-of-\*.json\)", False),
    "garbled data-iterator file": (_write("data/process_0-of-1.json", "{x"),
                                   r"data/process_0-of-1.json is not valid JSON", False),
}


def test_healthy_checkpoint_restores_exactly(two_steps, capfd):
    c = Checkpointer(two_steps, async_save=False)
    it = Iterator()
    step, state, meta = c.restore_latest(abstract(make_state(2)), it, log=pytest.fail)
    c.close()
    assert step == 2 and it.position == 20 and meta == {"step": 2}  # the checksums stay internal
    assert_same(state, make_state(2))
    assert_same(load_params(two_steps.parent), make_state(2)["params"])
    assert "Metadata file does not exist" not in capfd.readouterr().err  # load_params warned up to 12x per pipeline


def _largest_shard_elements(x) -> int:
    return max(int(np.prod(s.data.shape)) for s in x.addressable_shards)


def test_load_params_restores_sharded_never_whole_on_one_device(two_steps):
    """Without shardings, each leaf is split over the 8 devices along an axis they divide (the odd bias is
    replicated); with a mesh's shardings, every leaf lands exactly on them. Values equal the saved ones."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    saved = make_state(2)["params"]
    spread = load_params(two_steps.parent, step=2)
    assert_same(spread, saved)
    for name in ("w", "emb"):  # (96, 96) and (16, 96): 1/8 of each leaf per device
        x = spread[name]
        assert len(x.sharding.device_set) == 8 and _largest_shard_elements(x) * 8 == x.size, (name, x.sharding)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
    target = {"w": NamedSharding(mesh, P("fsdp", "tensor")), "b": NamedSharding(mesh, P("tensor")),
              "emb": NamedSharding(mesh, P(None, ("fsdp", "tensor")))}
    placed = load_params(two_steps.parent, shardings=target)
    assert_same(placed, saved)
    for name, x in placed.items():
        assert x.sharding == target[name], name
        assert _largest_shard_elements(x) * {"w": 8, "b": 4, "emb": 8}[name] == x.size, name
    assert placed["emb"].dtype == jnp.bfloat16  # the saved dtype is kept
    with pytest.raises(CheckpointMismatch, match=r"differ in .*b"):
        load_params(two_steps.parent, shardings={"w": target["w"], "emb": target["emb"]})


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_step_falls_back_to_the_previous_one(two_steps, tmp_path, damage):
    apply, reason, params_unreadable = DAMAGE[damage]
    d = copy_of(two_steps, tmp_path)
    apply(d / "2")
    if params_unreadable:  # a message naming the step, not AttributeError: 'NoneType' object has no attribute 'tree'
        with pytest.raises(CheckpointError, match=rf"{d}/2: {reason}"):
            load_params(d, step=2)
        with pytest.warns(UserWarning, match=rf"loading params of step 1; skipped damaged {d}/2: {reason}"):
            assert_same(load_params(d), make_state(1)["params"])
    c = Checkpointer(d, async_save=False)
    it, log = Iterator(), []
    step, state, meta = c.restore_latest(abstract(make_state(2)), it, log=log.append)
    assert step == 1 and it.position == 10 and meta == {"step": 1}  # the data position of step 1, not a restart
    assert_same(state, make_state(1))
    assert len(log) == 1 and log[0].startswith(f"checkpoint: resuming from step 1; skipped damaged {d}/2: ")
    assert __import__("re").search(reason, log[0]), log[0]
    assert f"moved to {d}/damaged/2" in log[0] and (d / "damaged" / "2").is_dir()  # kept, out of the way
    # the run continues and writes step 2 again without colliding with the damaged one
    c.save(2, make_state(22), Iterator(222), meta={"step": 2}, force=True)
    assert c.all_steps() == [1, 2]
    step, state, _ = c.restore_latest(abstract(make_state(2)), it, log=pytest.fail)
    c.close()
    assert step == 2 and it.position == 222
    assert_same(state, make_state(22))


@pytest.mark.parametrize("missing", ["_CHECKPOINT_METADATA", "state/_METADATA"])
def test_lost_bookkeeping_files_do_not_make_a_step_unloadable(two_steps, tmp_path, missing, capfd):
    # orbax restores these steps against the target shapes; the checksums prove the arrays are intact
    d = copy_of(two_steps, tmp_path)
    (d / "2" / missing).unlink()
    c = Checkpointer(d, async_save=False)
    it = Iterator()
    step, state, _ = c.restore_latest(abstract(make_state(2)), it, log=pytest.fail)
    c.close()
    assert step == 2 and it.position == 20
    assert_same(state, make_state(2))
    err = capfd.readouterr().err
    assert "Metadata file does not exist" not in err and "could not be restored" not in err


def test_no_loadable_step_is_one_error_naming_the_directory(two_steps, tmp_path):
    d = copy_of(two_steps, tmp_path)
    _empty(d / "2")
    _remove("data/process_0-of-1.json")(d / "1")
    c = Checkpointer(d, async_save=False)
    with pytest.raises(CheckpointError) as e:
        c.restore_latest(abstract(make_state(2)), Iterator(), log=pytest.fail)
    c.close()
    assert str(e.value) == (f"{d}: no checkpoint can be loaded ({d}/2: empty step directory (no state, meta or data "
                            f"item); {d}/1: item 'data' has no data-iterator file (process_*-of-*.json))")
    assert not (d / "damaged").exists()  # nothing moved when there is nothing to resume from


def test_a_differently_shaped_state_is_a_mismatch_not_damage(two_steps, tmp_path):
    d = copy_of(two_steps, tmp_path)
    c = Checkpointer(d, async_save=False)
    with pytest.raises(CheckpointMismatch) as e:
        c.restore_latest(abstract(make_state(2, n=64)), Iterator(), log=pytest.fail)
    c.close()
    assert str(e.value) == (f"{d}/2: the checkpoint holds a different model: opt/mu is [96] in the checkpoint but "
                            "[64] now; params/emb is [16, 96] in the checkpoint but [16, 64] now; params/w is [96, 96] "
                            "in the checkpoint but [64, 64] now. Did the model or algorithm config change? Use a new "
                            "train.out_dir.")
    assert sorted(os.listdir(d)) == ["1", "2"]


def test_checksums_are_exact_across_shardings(tmp_path):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sharding import make_mesh

    mesh = make_mesh(2, 4, 1, 1)
    state = make_state(3, n=64)
    sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(*(("fsdp",) if x.ndim else ())))), state)
    assert checksums(sharded) == checksums(jax.device_get(state)) == checksums(state)
    flipped = jax.device_get(state)
    flipped["params"]["w"] = flipped["params"]["w"].copy()
    flipped["params"]["w"][[0, 1]] = flipped["params"]["w"][[1, 0]]  # same values, other places
    assert checksums(flipped)["params/w"] != checksums(state)["params/w"]
    c = Checkpointer(tmp_path / "c", async_save=False)
    c.save(3, sharded, meta={"step": 3}, force=True)
    step, restored, _ = c.restore_latest(abstract(state), log=pytest.fail)  # onto one device
    c.close()
    assert step == 3
    assert_same(restored, state)


# ---- full disks -----------------------------------------------------------------------------------
DRIVER = textwrap.dedent('''
    """Drives a Checkpointer the way the loop does: check() every step, save every 3 steps, wait and
    close at the end. After step FILL_AT the disk is filled (another writer), so the next save fails."""
    import os, sys, time
    import jax, jax.numpy as jnp
    sys.path.insert(0, {tests!r})
    from test_checkpoint import Iterator, make_state
    from jalign.checkpoint import Checkpointer, CheckpointWriteError

    directory, fill_at, async_save = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    ckpt, it, step = Checkpointer(directory, keep=5, async_save=async_save), Iterator(), 0
    try:
        try:
            while step < 30:
                step += 1
                state = make_state(step)
                it.position = 10 * step
                time.sleep(0.05)  # the train step
                ckpt.check()
                if step % 3 == 0:
                    ckpt.save(step, state, it, meta={{"step": step}}, force=True)
                if step == fill_at:
                    ckpt.wait()
                    with open(os.path.join(os.path.dirname(directory), "filler"), "wb") as f:
                        try:
                            while True:
                                f.write(b"x" * 65536)
                                f.flush()
                        except OSError:
                            pass
            ckpt.wait()
        finally:
            ckpt.close()
    except CheckpointWriteError as e:
        print(f"stopped at step {{step}}: {{e}}", file=sys.stderr)
        sys.exit(1)
''')


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB tmpfs (needs root / CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the injected-ENOSPC test covers this")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk_stops_with_one_message_and_keeps_the_previous_step(small_disk, tmp_path, async_save):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(Path(__file__).parent)))
    directory = small_disk / "checkpoints"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")  # conftest's XLA_FLAGS: same random state
    r = subprocess.run([sys.executable, str(script), str(directory), "7", str(int(async_save))], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no tracebacks, no orbax ERROR logs, nothing at interpreter exit
    stopped = int(lines[0].split()[3].rstrip(":"))
    assert lines[0].endswith(f"out of space at {directory} ({lines[0].split('(')[1].split(')')[0]}) while saving "
                             "step 9; the last good checkpoint is step 6"), lines[0]
    assert 9 <= stopped <= 10, lines[0]  # async: surfaced at the next step's check(), not 5 steps later
    assert sorted(os.listdir(directory)) == ["3", "6"]  # the partial step 9 is removed, nothing else
    (small_disk / "filler").unlink()
    c = Checkpointer(directory, async_save=False)
    it = Iterator()
    step, state, _ = c.restore_latest(abstract(make_state(6)), it, log=pytest.fail)
    c.close()
    assert step == 6 and it.position == 60
    assert_same(state, make_state(6))


def test_injected_enospc_in_a_background_write(tmp_path, monkeypatch):
    """Without a mountable tmpfs: ENOSPC raised where orbax writes array bytes (its lowest Python layer)."""
    from orbax.checkpoint._src.serialization import serialization

    original, full = serialization.async_serialize_from_host, {"on": False}

    async def write(*args, **kwargs):
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await original(*args, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", write)
    d = tmp_path / "checkpoints"
    ckpt, it = Checkpointer(d, keep=5, async_save=True), Iterator()
    ckpt.save(3, make_state(3), Iterator(30), meta={"step": 3}, force=True)
    ckpt.wait()
    full["on"] = True
    ckpt.save(6, make_state(6), Iterator(60), meta={"step": 6}, force=True)
    with pytest.raises(CheckpointWriteError, match=rf"^out of space at {d} \(.* MiB free\) while saving step 6; the "
                                                   r"last good checkpoint is step 3$"):
        for _ in range(200):  # the loop's per-step check()
            ckpt.check()
            __import__("time").sleep(0.01)
    ckpt.check()  # reported once
    ckpt.close()  # and not again
    with pytest.raises(CheckpointWriteError, match="while saving step 6"):  # no further saves on a failed manager
        ckpt.save(9, make_state(9), it, force=True)
    full["on"] = False
    c = Checkpointer(d, async_save=False)
    step, state, _ = c.restore_latest(abstract(make_state(3)), it, log=pytest.fail)
    c.close()
    assert step == 3 and it.position == 30 and sorted(os.listdir(d)) == ["3"]
    assert_same(state, make_state(3))


# ---- resuming with a different config ---------------------------------------------------------------
def _run_dir(tmp_path, *overrides, in_meta=False):
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", list(overrides))
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    c = Checkpointer(run / "checkpoints", async_save=False)
    c.save(1, make_state(1), meta={"step": 1, **({"config": to_dict(cfg)} if in_meta else {})}, force=True)
    c.close()
    return run


def test_check_resume_config_names_changed_keys(tmp_path):
    run = _run_dir(tmp_path)
    check_resume_config(run, load_config(ROOT / "configs/sft_tiny.yaml", ["optim.lr=1e-4", "train.steps=900"]))
    with pytest.raises(ConfigError) as e:
        check_resume_config(run, load_config(ROOT / "configs/sft_tiny.yaml", ["model.hidden=256", "model.layers=2"]))
    msg = str(e.value)
    assert msg.startswith(f"{run}: cannot resume this run with a different model or algorithm (")
    assert "model.hidden: 128 in the checkpoints, 256 now" in msg and "model.layers: 4 in the checkpoints, 2 now" in msg
    assert "model.head_dim: 32 in the checkpoints, 64 now" in msg and f"saved config: {run}/config.yaml" in msg
    with pytest.raises(ConfigError, match=r"algorithm.name: 'sft' in the checkpoints, 'dpo' now"):
        check_resume_config(run, load_config(ROOT / "configs/dpo_tiny.yaml", ["model.init_from=null"]))
    with pytest.raises(ConfigError, match=r"model.init_from: None in the checkpoints, '.*/runs/sft_tiny' now"):
        check_resume_config(run, load_config(ROOT / "configs/sft_tiny.yaml", ["model.init_from=runs/sft_tiny"]))
    check_resume_config(tmp_path / "fresh", load_config(ROOT / "configs/sft_tiny.yaml", ["model.hidden=256"]))


def test_check_resume_config_prefers_the_config_saved_in_the_checkpoint(tmp_path):
    # a failing invocation overwrote config.yaml; the checkpoint's own copy still says what was trained
    run = _run_dir(tmp_path, in_meta=True)
    dump_config(load_config(ROOT / "configs/sft_tiny.yaml", ["model.hidden=64"]), run / "config.yaml")
    check_resume_config(run, load_config(ROOT / "configs/sft_tiny.yaml"))
    with pytest.raises(ConfigError, match=rf"model.hidden: 128 in the checkpoints, 64 now.*saved config: "
                                          rf"{run}/checkpoints/1 \(meta\)"):
        check_resume_config(run, load_config(ROOT / "configs/sft_tiny.yaml", ["model.hidden=64"]))
