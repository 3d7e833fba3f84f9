"""Test setup, applied before JAX is imported.

- 8 fake CPU devices for the sharding tests.
- ``--xla_backend_optimization_level=0``: the CPU compiler's LLVM optimisation level. Tests are
  dominated by compile time (interpret-mode Pallas kernels, many small shapes) and level 0
  compiles ~4x faster; it changes code generation only, not the HLO or the float arithmetic.
- A persistent compilation cache shared by the session's workers (a fresh directory per session,
  made by the first process and inherited by the xdist workers and by subprocesses): the suite
  builds the same tiny models in many tests and recipes, and compiling dominates its run time.
  A hit skips only XLA's compile of an identical HLO module; tracing, dispatch and lowering
  still run, so every test still checks what it checks.
"""

import os
import tempfile

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", "")]
  + [f for f in _FLAGS if f not in os.environ.get("XLA_FLAGS", "")]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="memzoo-test-jax-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
