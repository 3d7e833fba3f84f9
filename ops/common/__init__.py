"""Helpers shared by every op: implementation dispatch and the record of what served."""

from ops.common.dispatch import (
  SIMULATE_ENV,
  Implementation,
  NotSupportedError,
  backend,
  dispatch,
  implementations,
  marking_flops,
  note_served,
  reset_served,
  served,
  simulated_backend,
)

__all__ = [
  "SIMULATE_ENV",
  "Implementation",
  "NotSupportedError",
  "backend",
  "dispatch",
  "implementations",
  "marking_flops",
  "note_served",
  "reset_served",
  "served",
  "simulated_backend",
]
