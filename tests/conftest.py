"""Test setup, applied before JAX is imported.

- 8 fake CPU devices for the sharding tests.
- ``--xla_backend_optimization_level=0``: the CPU compiler's LLVM optimisation level. Tests are
  dominated by compile time (interpret-mode Pallas kernels, many small shapes) and level 0
  compiles ~4x faster; it changes code generation only, not the HLO or the float arithmetic.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", "")]
  + [f for f in _FLAGS if f not in os.environ.get("XLA_FLAGS", "")]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
