"""Pallas GPU (Triton) kernels of the chunked gated delta rule.

The kernel bodies (``pallas_kernels``), their ``pallas_call``s (``pallas_calls``) and the
host side with the ``custom_vjp`` (``pallas_common``) are shared by both platforms; this module
fixes the platform and refuses what those kernels do not serve.
"""

from __future__ import annotations

import inspect

from ops.common.dispatch import NotSupportedError
from ops.memory.gated_delta import pallas_common

# Packed sequences need kernels that reset the state at segment starts.
_TAKES_SEGMENTS = (
  "segment_ids" in inspect.signature(pallas_common.chunk_gated_delta_rule).parameters
)


def chunk_gated_delta_rule(q, k, v, g, beta, *, segment_ids=None, **kwargs):
  """``pallas_common.chunk_gated_delta_rule(..., platform="gpu")``: any K and V.

  Args:
    q, k, v, g, beta: as ``ops.memory.gated_delta_rule`` (float32 gates).
    segment_ids: optional ``[B,T]`` int ids of packed sequences.
    **kwargs: ``scale``, ``initial_state``, ``chunk_size``, ``interpret``.

  Returns:
    ``(o [B,T,H,V], final_state [B,H,K,V] float32)``.

  Raises:
    NotSupportedError: ``segment_ids`` given to kernels without segment resets.
  """
  if segment_ids is not None:
    if not _TAKES_SEGMENTS:
      raise NotSupportedError("the pallas_gpu kernels do not take segment_ids (packed sequences)")
    kwargs["segment_ids"] = segment_ids
  return pallas_common.chunk_gated_delta_rule(q, k, v, g, beta, platform="gpu", **kwargs)
