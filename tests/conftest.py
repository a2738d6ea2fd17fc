"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""
import os

# 8 simulated devices; the LLVM optimisation level only trades CPU kernel speed for compile time,
# which dominates a test suite of many small programs (about 2x faster to compile). The simulated devices
# are threads of one process: on a loaded machine one of them can reach a collective more than XLA's
# default 40 s after the others, and XLA then aborts the process (rendezvous "Termination timeout"), so
# the suite waits longer (a real deadlock still ends, after 10 minutes).
PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
                       " --xla_cpu_collective_call_terminate_timeout_seconds=600")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                           + PATIENT_COLLECTIVES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Many tests build the same small programs in fresh jit wrappers (e.g. several train() calls of a
# resume test); the persistent compilation cache turns those repeat compiles into cache hits. Set through
# jax's environment variables (read when jax is imported), so the processes tests start inherit it too:
# the notebook's kernel, the 2-process workers and `python -m jalign` (which keeps a cache directory
# given to jax) compile into and load from the same cache instead of compiling from scratch every run.
TEST_CACHE = os.environ.get("JALIGN_TEST_JAX_CACHE", "/tmp/jalign-test-jax-cache")
os.environ["JAX_COMPILATION_CACHE_DIR"] = TEST_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", TEST_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_collection_modifyitems(config, items):
    """The end-to-end runs (marked ``slow``) first: with ``-n 2`` each starts while the other worker still has
    short tests to take, instead of one of them running alone at the end of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise collection order
