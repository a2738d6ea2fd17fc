"""Multi-process initialisation (``jax.distributed``); a no-op for a single process.

Where the process layout comes from, first match wins, field by field:

1. the config: ``distributed.coordinator_address`` / ``num_processes`` / ``process_id`` (also as
   ``key=value`` overrides on the command line);
2. jalign's environment: ``JALIGN_COORDINATOR`` (host:port), ``JALIGN_NUM_PROCESSES``,
   ``JALIGN_PROCESS_ID`` (what ``launch/local.sh``, ``launch/slurm.sbatch`` and
   ``launch/k8s-jobset.yaml`` set);
3. jax's environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
4. a cluster jax detects itself (``distributed.cluster_detection: auto``): in jax 0.10.2 that is
   SLURM (``srun``: SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID),
   Open MPI (``mpirun``: OMPI_MCA_orte_hnp_uri), Cloud TPU VMs (GCE metadata / GKE TPU_WORKER_*),
   and Kubernetes (KUBERNETES_SERVICE_HOST + the ``kubernetes`` package + pod-read RBAC);
   ``mpi4py`` only when named. A detected cluster with one task is left alone.

If the layout names one process (or none is found) nothing is initialised. On CPU the cross-process
collectives are gloo (``distributed.cpu_collectives``).

Failure behaviour (all bounded by the config's timeouts, never a hang):
* coordinator unreachable: :class:`DistributedError` after ``initialization_timeout`` seconds (the
  port is probed first); a peer that never registers: jax aborts the waiting processes after the
  same timeout (``DEADLINE_EXCEEDED ... RegisterTask``, status 134);
* a peer dies mid-run: the coordinator misses its heartbeats for ``heartbeat_timeout`` seconds and
  every other process is terminated by jax's runtime with a non-zero status (if the peer's death first
  breaks a collective, that raises at once and :func:`fail_fast` exits non-zero without waiting for
  the shutdown barrier, which would otherwise wait ``shutdown_timeout`` seconds for the dead peer).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Optional

from jalign.config import ConfigError, DistributedConfig

_ENV = {
    "coordinator_address": ("JALIGN_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("JALIGN_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("JALIGN_PROCESS_ID", "JAX_PROCESS_ID"),
}
_initialized = False


class DistributedError(RuntimeError):
    """jax.distributed could not be started (coordinator unreachable, peers missing, bad layout)."""


@dataclasses.dataclass
class Layout:
    coordinator_address: Optional[str]
    num_processes: Optional[int]
    process_id: Optional[int]
    source: str  # where the values came from, for messages
    cluster: Optional[str] = None  # a detected cluster environment fills whatever is None


def resolve(d: DistributedConfig, environ=None) -> Optional[Layout]:
    """The process layout from config, environment or a detected cluster; None means one process.

    Pure apart from cluster detection (which only reads the environment, or for Kubernetes / Cloud
    TPU asks their APIs), so it can be called before anything touches a device.
    """
    env = os.environ if environ is None else environ
    values, sources = {}, []
    for key, names in _ENV.items():
        value = getattr(d, key)
        if value is not None:
            sources.append(f"distributed.{key}")
        else:
            for name in names:
                if env.get(name):
                    value = env[name] if key == "coordinator_address" else _env_int_from(env, name)
                    sources.append(name)
                    break
        values[key] = value
    n, pid = values["num_processes"], values["process_id"]
    if n is not None and n < 1:
        raise ConfigError(f"{_src(sources)}: num_processes must be >= 1, got {n}")
    if n is not None and pid is not None and not 0 <= pid < n:
        raise ConfigError(f"{_src(sources)}: process_id {pid} is not in [0, {n})")
    for key in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"distributed.{key}: must be a positive number of seconds, got {getattr(d, key)}")
    explicit = [k for k, v in values.items() if v is not None]
    if n == 1:
        return None
    if len(explicit) == 3:
        return Layout(**values, source=", ".join(sources))
    if d.cluster_detection == "off":
        if explicit:
            missing = sorted(set(_ENV) - set(explicit))
            raise ConfigError(f"distributed: {', '.join(sources)} set but {', '.join(missing)} missing "
                              f"(and distributed.cluster_detection=off): set all of coordinator_address, "
                              f"num_processes and process_id")
        return None
    cluster = _detect_cluster(d.cluster_detection)
    if cluster is None:
        if explicit:
            missing = sorted(set(_ENV) - set(explicit))
            raise ConfigError(f"distributed: {', '.join(sources)} set but {', '.join(missing)} missing and "
                              f"no cluster environment (SLURM, Open MPI, Kubernetes, TPU) detected to fill them")
        return None
    name, count = cluster
    if n is None and count == 1:
        return None  # e.g. an interactive single-task SLURM allocation
    return Layout(**values, source=", ".join(sources + [f"{name} environment"]), cluster=name)


def _env_int_from(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment {name}={env[name]!r}: expected an integer") from None


def _src(sources: list) -> str:
    return ", ".join(sources) or "distributed"


def _detect_cluster(method: str) -> Optional[tuple[str, int]]:
    """(name, process count) of the cluster environment jax would use, or None."""
    try:
        from jax._src import clusters
    except ImportError:  # private module moved in a later jax: no detection (set the layout explicitly)
        return None
    envs = list(clusters.ClusterEnv._cluster_types)
    if method == "auto":
        envs = [e for e in envs if not e.opt_in_only_method]
    else:
        envs = [e for e in envs if e.name == method]
        if not envs:
            known = sorted(e.name for e in clusters.ClusterEnv._cluster_types if e.name)
            raise ConfigError(f"distributed.cluster_detection={method!r}: not one of auto, off, {', '.join(known)}")
    for env in envs:
        try:
            if env.is_env_present():
                return (env.name or env.__name__), int(env.get_process_count())
        except Exception as e:  # noqa: BLE001 - a half-configured environment: report it, do not guess
            raise DistributedError(f"cluster environment {env.__name__} detected but unusable: {e}") from e
    return None


def initialize(cfg=None) -> None:
    """Start ``jax.distributed`` when the layout names several processes; call before any JAX work."""
    global _initialized
    if _initialized:
        return
    d = cfg.distributed if cfg is not None else DistributedConfig()
    layout = resolve(d)
    if layout is None:
        return
    import jax

    if d.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    kwargs = dict(
        coordinator_address=layout.coordinator_address, num_processes=layout.num_processes,
        process_id=layout.process_id, local_device_ids=d.local_device_ids,
        initialization_timeout=int(d.initialization_timeout), heartbeat_timeout_seconds=int(d.heartbeat_timeout),
        shutdown_timeout_seconds=int(d.shutdown_timeout),
        # A complete explicit layout must not be second-guessed by jax's detection (under SLURM it would
        # otherwise restrict each process to GPU SLURM_LOCALID even with one process per node).
        cluster_detection_method="deactivate" if layout.cluster is None else (
            None if d.cluster_detection == "auto" else d.cluster_detection),
    )
    where = (f"process {layout.process_id if layout.process_id is not None else '?'} of "
             f"{layout.num_processes or '?'}, coordinator {layout.coordinator_address or '(from ' + str(layout.cluster) + ')'}"
             f", from {layout.source}")
    print(f"jalign: starting jax.distributed ({where}; initialization_timeout={d.initialization_timeout}s, "
          f"heartbeat_timeout={d.heartbeat_timeout}s)", file=sys.stderr, flush=True)
    if layout.coordinator_address and layout.process_id not in (None, 0):
        # jax's client aborts the whole process (SIGABRT, no Python exception) when it cannot register
        # with the coordinator; probing the port first turns the common case into a clear error.
        _wait_for_port(layout.coordinator_address, d.initialization_timeout, where)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - jaxlib raises XlaRuntimeError / ValueError / RuntimeError
        raise DistributedError(
            f"jax.distributed.initialize failed ({where}) within distributed.initialization_timeout="
            f"{d.initialization_timeout}s: {e}\n  check that process 0 is running and its coordinator "
            f"port is reachable from this host, and that every process got the same coordinator address "
            f"and num_processes") from e
    _initialized = True
    print(f"jalign: jax.distributed initialised: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices ({where})",
          file=sys.stderr, flush=True)


def _wait_for_port(address: str, timeout: float, where: str) -> None:
    """Return once ``host:port`` accepts TCP connections; DistributedError after ``timeout`` s."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"cannot reach the coordinator {address} ({where}) within "
                f"distributed.initialization_timeout={timeout}s: {last}\n  is process 0 running, listening "
                f"on that port, and reachable from this host?")
        time.sleep(0.5)


def is_multiprocess() -> bool:
    import jax

    return jax.process_count() > 1


@contextmanager
def fail_fast():
    """On several processes, an exception ends this process at once with status 1.

    A normal interpreter exit runs jax's shutdown barrier, which waits up to
    ``distributed.shutdown_timeout`` for peers that may be stuck in a collective waiting for *this*
    process; exiting immediately instead lets the coordinator's heartbeat check terminate them within
    ``distributed.heartbeat_timeout``. Single process: exceptions propagate unchanged.
    """
    try:
        yield
    except BaseException as e:
        if not _initialized or (isinstance(e, SystemExit) and not e.code):
            raise
        import jax

        status = _exit_status(e)
        traceback.print_exc()
        print(f"jalign: process {jax.process_index()} of {jax.process_count()} failed: "
              f"{type(e).__name__}: {e}\njalign: exiting with status {status} without waiting for the other "
              f"processes (they stop within distributed.heartbeat_timeout)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(status)


def _exit_status(e: BaseException) -> int:
    """The status `jalign train` uses for this error on one process (jalign.cli): a user error's own
    ``exit_code`` (2 for bad input), 3 for a diverged run, else 1."""
    from jalign.errors import JalignError

    if isinstance(e, JalignError):
        return int(getattr(e, "exit_code", 2))
    return 3 if type(e).__name__ == "TrainingDiverged" else 1
