"""Pallas GPU (Triton lowering) kernel for the neural memory (Titans configuration).

The kernel body (``pallas_kernels.py``), the host side and the ``custom_vjp``
(``pallas_common.py``) are shared with the other platform; this module fixes the platform.
"""

from __future__ import annotations

from ops.memory.neural import pallas_common


def neural_memory(q, k, v, theta, eta, alpha, gamma, state, *, chunk_size, **config):
  """Neural memory with the Pallas forward kernel for gpu.

  Args:
    q, k: [B,T,H,F] feature-mapped float32.
    v: [B,T,H,V] float32.
    theta, eta, alpha, gamma: [B,T,H] float32 (lr, momentum, decay, Omega weight).
    state: the state dict at the first token.
    chunk_size: C, a power of two >= 8.
    **config: offset, window, objective, optimizer, ns_steps, activation, residual,
      self_targets, interpret.

  Returns:
    ``(y [B,T,H,V] float32, final_state)``.

  Raises:
    NotSupportedError: an option or shape the kernel does not cover (Muon, the "dot"
      objective, omega_window > 1, self_targets, a traced position, tile sizes the platform
      cannot lower).
  """
  return pallas_common.neural_memory_pallas(
    q, k, v, theta, eta, alpha, gamma, state, chunk_size=chunk_size, platform="gpu", **config
  )
