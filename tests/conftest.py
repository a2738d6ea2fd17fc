"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""
import os

# 8 simulated devices; the LLVM optimisation level only trades CPU kernel speed for compile time,
# which dominates a test suite of many small programs (about 2x faster to compile).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
