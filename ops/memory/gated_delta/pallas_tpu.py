"""Pallas Mosaic TPU entry of the chunked gated delta rule; the code is in ``pallas_common``."""

from __future__ import annotations

from ops.memory.gated_delta import pallas_common


def chunk_gated_delta_rule(q, k, v, g, beta, **kwargs):
  """``pallas_common.chunk_gated_delta_rule(..., platform="tpu")``: any K and V, same arguments."""
  return pallas_common.chunk_gated_delta_rule(q, k, v, g, beta, platform="tpu", **kwargs)
