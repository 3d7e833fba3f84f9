"""Pallas GPU (Triton) kernels of the chunked gated delta rule.

The kernel bodies (``pallas_kernels``), their ``pallas_call``s (``pallas_calls``) and the
host side with the ``custom_vjp`` (``pallas_common``) are shared by both platforms; this module
fixes the platform.
"""

from __future__ import annotations

import functools

from ops.memory.gated_delta import pallas_common

# (q, k, v, g, beta, *, segment_ids=None, scale, initial_state, chunk_size, interpret) ->
# (o [B,T,H,V], final_state [B,H,K,V] float32), as ``ops.memory.gated_delta_rule``; any K, V,
# chunk size and packed segments.
chunk_gated_delta_rule = functools.partial(pallas_common.chunk_gated_delta_rule, platform="gpu")
