"""The loader on 2 processes x 4 CPU devices equals 1 process x 8, for an HF and a run directory.

Each process reads only its own devices' slices (process 0 is not special): every shard either
process holds equals the single-process load at the same index, and together they cover every
device of the mesh. A run saved by the 2 processes loads back in one.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jalign.models import params as params_lib
from jalign.models.load import load_params, parse_source
from jalign.models.transformer import declare_params
from sharding import make_mesh
from sharding.rules import DEFAULT_RULES
from load_multihost_worker import index_key
from test_load import CFG, MESHES, build_hf_dir, save_run, source_values

ROOT = Path(__file__).parent.parent
WORKER = ROOT / "tests/load_multihost_worker.py"
XLA_BASE = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(out, hf_dir, run_dir):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{XLA_BASE} --xla_force_host_platform_device_count=4",
               JALIGN_COORDINATOR=f"127.0.0.1:{port}", JALIGN_NUM_PROCESSES="2", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), str(hf_dir), str(run_dir)],
                              env=dict(env, JALIGN_PROCESS_ID=str(i)), stdout=open(out / f"log_{i}.txt", "wb"),
                              stderr=subprocess.STDOUT) for i in range(2)]
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, (out / f"log_{i}.txt").read_text(errors="replace")[-5000:]


def _load(spec, mesh, decls):
    return params_lib.flatten(load_params(parse_source(spec, where="test"), decls, mesh=mesh, rules=DEFAULT_RULES,
                                          dtype=jnp.float32, seed=0, log=lambda *_: None))


def _index(key: str):
    return tuple(slice(*map(int, part.split(":"))) for part in key.split(","))


def test_two_processes_load_what_one_process_loads(tmp_path):
    hf_dir = build_hf_dir(tmp_path / "hf")
    decls = declare_params(CFG)
    values = source_values(decls, 9)
    run_dir = save_run(tmp_path / "run", CFG, {7: values})
    out = tmp_path / "out"
    out.mkdir()
    _run_pair(out, hf_dir, run_dir)

    single = {}
    for mesh_name, sizes in MESHES.items():
        mesh = make_mesh(**sizes)
        single[mesh_name, "hf"] = _load(f"hf:{hf_dir}", mesh, decls)
        single[mesh_name, "run"] = _load(f"run:{run_dir}", mesh, decls)
    np.testing.assert_array_equal(np.asarray(single["fsdp8", "run"]["layers/q"]), values["layers/q"])

    covered = {}
    for pid in range(2):
        shards = np.load(out / f"shards_{pid}.npz")
        assert len(shards.files) > 0
        for key in shards.files:
            mesh_name, kind, path, index = key.split("|")
            full = np.asarray(single[mesh_name, kind][path])
            np.testing.assert_array_equal(shards[key], full[_index(index)], err_msg=f"process {pid}: {key}")
            covered.setdefault((mesh_name, kind, path), {}).setdefault(index, set()).add(pid)
        # each process mapped the safetensors itself (no reading on process 0 and broadcasting)
        assert json.loads((out / f"reads_{pid}.json").read_text())["reads"] > 0
    shapes = {p: d.shape for p, d in params_lib.flatten(decls).items()}
    assert len(covered) == 2 * 2 * len(shapes)
    for (mesh_name, kind, path), indices in covered.items():
        sharding = single[mesh_name, kind][path].sharding
        expected = {index_key(idx, shapes[path]) for idx in sharding.devices_indices_map(shapes[path]).values()}
        assert set(indices) == expected, (mesh_name, kind, path)  # together: every slice of the tensor
    # both processes hold shards of every sharded leaf on the fsdp=8 mesh: neither is a reader for the other
    for path in params_lib.flatten(decls):
        owners = set().union(*covered["fsdp8", "hf", path].values())
        assert owners == {0, 1}, path

    # the run saved by 2 processes (from the 2x2x2 layout) loads in 1 process onto fsdp=8
    back = _load(f"run:{out / 'run2'}", make_mesh(**MESHES["fsdp8"]), decls)
    for path, x in back.items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(single["fsdp8", "hf"][path]), err_msg=path)
