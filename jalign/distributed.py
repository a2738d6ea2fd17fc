"""Multi-process initialisation (``jax.distributed``); a no-op for a single process."""
from __future__ import annotations

import os

import jax

_initialized = False


def initialize(cfg=None) -> None:
    """Start ``jax.distributed`` when the environment describes several processes.

    Recognised: JALIGN_COORDINATOR / JALIGN_NUM_PROCESSES / JALIGN_PROCESS_ID (set by launch/local.sh),
    and the cluster environments jax detects itself (SLURM, Kubernetes, ...) when
    JALIGN_DISTRIBUTED=auto.
    """
    global _initialized
    if _initialized:
        return
    coordinator = os.environ.get("JALIGN_COORDINATOR")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JALIGN_NUM_PROCESSES"]),
            process_id=int(os.environ["JALIGN_PROCESS_ID"]),
        )
        _initialized = True
    elif os.environ.get("JALIGN_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        _initialized = True
