"""Device meshes over the axes ("data", "fsdp", "tensor", "sequence")."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor", "sequence")


def resolve_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill in one ``-1`` axis with the remaining devices and check the product (the one resolver: the
    config's device checks call it too)."""
    sizes = {a: int(sizes.get(a, 1)) for a in AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [a for a, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    if free:
        if num_devices % fixed:
            raise ValueError(f"the fixed mesh axes multiply to {fixed}, which does not divide the {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    product = math.prod(sizes.values())
    if product != num_devices:
        raise ValueError(f"mesh data*fsdp*tensor*sequence = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']}*"
                         f"{sizes['sequence']} = {product} but there are {num_devices} devices")
    return sizes


def _device_grid(shape: tuple[int, ...], devices: Sequence) -> np.ndarray:
    """Order devices so the fast axes (tensor, sequence) stay within a process (host).

    Devices are sorted by (process, id); the mesh array is filled in row-major order over
    (data, fsdp, tensor, sequence), so the trailing axes vary fastest and land on devices of the same
    process whenever tensor*sequence divides the per-process device count. data/fsdp then span
    processes (DCN), which is what multi-host GPU clusters want.
    """
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    n_proc = len({d.process_index for d in devices})
    per_proc = len(devices) // n_proc
    inner = shape[2] * shape[3]
    if n_proc > 1 and per_proc % inner and inner % per_proc:
        raise ValueError(
            f"tensor*sequence={inner} does not fit the {per_proc} devices of each process; "
            "choose tensor/sequence sizes that divide (or are multiples of) the devices per host"
        )
    return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, sequence: int = 1, devices: Optional[Sequence] = None
) -> Mesh:
    """Build a ``Mesh`` with axes (data, fsdp, tensor, sequence); ``-1`` takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_sizes(dict(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence), len(devices))
    shape = tuple(sizes[a] for a in AXES)
    return Mesh(_device_grid(shape, devices), AXES)
