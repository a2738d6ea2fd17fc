"""One process of the 2-process rollout-engine test (tests/test_rollout_engine.py).

    JALIGN_COORDINATOR=... JALIGN_NUM_PROCESSES=2 JALIGN_PROCESS_ID=i python tests/rollout_worker.py HF_DIR OUT.npz

Every process calls ``jalign.rollout.generate(return_device=True)`` with the same global prompts on a
(data=4, tensor=2) mesh over both processes' devices; each serves only its own rows and writes them
(with the row ids) to OUT.npz, after checking that its shards of the global device arrays hold exactly
those rows.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4], [100, 101, 102, 103], [7] * 19, [42, 43, 44],
           [9, 8, 7, 6, 5, 4, 3, 2, 1, 200]]
SETTINGS = dict(max_new_tokens=50, temperature=0.9, top_k=12, top_p=0.95, eos_ids=(2,), num_samples=2, rng=5,
                page_size=8, steps_per_call=16)


def main(hf_dir: str, out: str) -> None:
    from jalign.distributed import fail_fast, initialize

    initialize()
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from jalign import rollout
    from jalign.models.hf_io import load_hf_params, model_config_from_hf
    from sharding import make_mesh

    with fail_fast():
        assert jax.process_count() == 2, jax.process_count()
        mesh = make_mesh(data=4, fsdp=1, tensor=2, sequence=1)
        cfg = model_config_from_hf(hf_dir)
        params = load_hf_params(hf_dir, cfg, mesh=mesh)
        res = rollout.generate(params, cfg, PROMPTS, mesh=mesh, return_device=True, slots=8, **SETTINGS)
        host, N = res["host"], SETTINGS["max_new_tokens"]
        tok = res["tokens"]
        assert not tok.is_fully_addressable  # a global array: no process holds every row
        for shard in tok.addressable_shards:
            rows = np.arange(tok.shape[0])[shard.index[0]]
            for j, r in enumerate(rows):
                if r >= len(PROMPTS) * SETTINGS["num_samples"]:  # padding rows of the power-of-two batch
                    assert (np.asarray(shard.data)[j] == 0).all()  # pad_id
                    continue
                mine = np.flatnonzero(res["rows"] == r)
                assert len(mine) == 1, (r, res["rows"])
                np.testing.assert_array_equal(np.asarray(shard.data)[j], host["tokens"][mine[0]])
        np.savez(out, rows=res["rows"], tokens=host["tokens"][:, :N], logprobs=host["logprobs"][:, :N],
                 lengths=host["lengths"], ended=host["ended_with_eos"], requests=res["stats"]["requests"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
