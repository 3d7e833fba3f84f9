"""Pallas GPU (Triton lowering) kernels for the chunked gated delta rule.

The kernel bodies (``pallas_kernels.py``), their ``pallas_call`` wrappers (``pallas_calls.py``)
and the ``custom_vjp`` (``pallas_common.py``) are shared with the other platform; this module
fixes the platform.
"""

from __future__ import annotations

from ops.memory.gated_delta import pallas_common


def chunk_gated_delta_rule(
  q,
  k,
  v,
  g,
  beta,
  *,
  scale: float,
  initial_state,
  chunk_size: int,
  interpret: bool,
  block_v: int | None = None,
):
  """Chunked gated delta rule, forward and backward in Pallas for gpu.

  Args:
    q: ``[B,T,H,K]``.
    k: ``[B,T,H,K]``.
    v: ``[B,T,H,V]``.
    g: ``None``, ``[B,T,H]`` or ``[B,T,H,K]`` (per key channel) float32 log decay (<= 0).
    beta: ``None`` (additive write) or ``[B,T,H]`` float32 (delta rule).
    scale: output scale.
    initial_state: ``None`` or ``[B,H,K,V]`` float32.
    chunk_size: ``C``.
    interpret: run in the Pallas interpreter (CPU testing).
    block_v: value-dim block of the sequential kernels (default: by platform).

  Returns:
    ``(o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32)``.

  Raises:
    NotSupportedError: shapes the platform cannot tile.
    ValueError: inconsistent shapes.
  """
  return pallas_common.chunk_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    scale=scale,
    initial_state=initial_state,
    chunk_size=chunk_size,
    interpret=interpret,
    platform="gpu",
    block_v=block_v,
  )
