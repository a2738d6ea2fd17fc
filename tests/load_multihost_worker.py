"""One process of the 2-process loader test (tests/test_load_multihost.py).

    JALIGN_COORDINATOR=... JALIGN_NUM_PROCESSES=2 JALIGN_PROCESS_ID=i python tests/load_multihost_worker.py \
        OUT_DIR HF_DIR RUN_DIR

Loads the HF directory and the run directory with ``jalign.models.load`` onto two meshes spanning both
processes, and writes every addressable shard (keyed by mesh, source, leaf and index) to
``OUT_DIR/shards_<process>.npz``, with the number of safetensors tensors this process mapped and read
to ``OUT_DIR/reads_<process>.json``. Then both processes save the HF-loaded params as a run directory
(``OUT_DIR/run2``) that the single-process test loads back.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MESHES = {"fsdp8": dict(data=1, fsdp=8), "2x2x2": dict(data=2, fsdp=2, tensor=2)}


def index_key(index, shape) -> str:
    return ",".join(f"{a}:{b}" for a, b in (s.indices(n)[:2] for s, n in zip(index, shape)))


def main(out: Path, hf_dir: str, run_dir: str) -> None:
    from jalign import distributed

    distributed.initialize()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from jalign.checkpoint import Checkpointer
    from jalign.config import Config, dump_config
    from jalign.models import hf_io
    from jalign.models import params as params_lib
    from jalign.models.load import load_params, parse_source, source_architecture
    from jalign.models.transformer import declare_params
    from sharding import make_mesh
    from sharding.rules import DEFAULT_RULES

    assert jax.process_count() == 2 and jax.local_device_count() == 4
    reads = []
    array = hf_io.SafetensorsFile.array
    hf_io.SafetensorsFile.array = lambda self, name: reads.append(name) or array(self, name)
    run = parse_source(f"run:{run_dir}", where="test")
    cfg = source_architecture(run)
    decls = declare_params(cfg)
    shards, loaded = {}, {}
    for mesh_name, sizes in MESHES.items():
        mesh = make_mesh(**sizes)
        for kind, source in (("hf", parse_source(f"hf:{hf_dir}", where="test")), ("run", run)):
            params = load_params(source, decls, mesh=mesh, rules=DEFAULT_RULES, dtype=jnp.float32, seed=0,
                                 log=lambda *_: None)
            loaded[mesh_name, kind] = params
            for path, x in params_lib.flatten(params).items():
                for shard in x.addressable_shards:
                    key = f"{mesh_name}|{kind}|{path}|{index_key(shard.index, x.shape)}"
                    value = np.asarray(shard.data)
                    if key in shards:  # a replica on another local device: must be identical
                        np.testing.assert_array_equal(shards[key], value)
                    shards[key] = value
    pid = jax.process_index()
    np.savez(out / f"shards_{pid}.npz", **shards)
    (out / f"reads_{pid}.json").write_text(json.dumps({"reads": len(reads)}))
    params = loaded["2x2x2", "hf"]
    replicated = NamedSharding(make_mesh(**MESHES["2x2x2"]), PartitionSpec())
    ckpt = Checkpointer(out / "run2" / "checkpoints", async_save=False)
    ckpt.save(1, {"step": jax.device_put(np.int32(1), replicated), "params": params,
                  "rng": jax.device_put(np.zeros(2, np.uint32), replicated)})
    ckpt.close()
    if pid == 0:
        dump_config(Config(model=cfg), out / "run2" / "config.yaml")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
