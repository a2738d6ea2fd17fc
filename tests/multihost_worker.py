"""`jalign train` for the multi-process tests (run by launch/local.sh via JALIGN_CMD).

    JALIGN_CMD="python tests/multihost_worker.py" launch/local.sh 2 CONFIG key=value ...

Identical to ``python -m jalign train ...``, plus, when JALIGN_TEST_RECORD is a directory, every host
batch this process feeds to the SFT step is appended to ``<dir>/batches_<process>.npz`` (tokens and
loss masks per step), so a test can check that each example is seen exactly once across processes,
and its pid to ``<dir>/pid_<JALIGN_PROCESS_ID>``.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def record_batches(directory: str) -> None:
    import jax
    import numpy as np

    from jalign.algorithms import sft

    steps = []
    original = sft.SFT.step

    def step(self, state, roles, batch):
        steps.append({k: np.asarray(batch[k]) for k in ("tokens", "loss_mask")})
        out = original(self, state, roles, batch)
        path = Path(directory) / f"batches_{jax.process_index()}.npz"
        np.savez(path, **{f"{k}_{i}": v for i, b in enumerate(steps) for k, v in b.items()})
        return out

    sft.SFT.step = step


if __name__ == "__main__":
    if os.environ.get("JALIGN_TEST_RECORD"):
        record = Path(os.environ["JALIGN_TEST_RECORD"])
        (record / f"pid_{os.environ.get('JALIGN_PROCESS_ID', 0)}").write_text(str(os.getpid()))
        record_batches(str(record))
    from jalign.cli import main

    sys.exit(main(sys.argv[1:]))
