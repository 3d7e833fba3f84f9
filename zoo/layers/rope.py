"""Rotary position embeddings and their scaling variants for length extrapolation.

Variants (``RopeScaling.kind``): ``none``; ``linear`` (position interpolation, Chen et al.);
``ntk`` (NTK-aware base scaling); ``dynamic_ntk`` (NTK scaling that grows with the current
length); ``yarn`` (per-frequency ramp between interpolation and extrapolation, with YaRN's
attention temperature); ``abf`` (adjusted base frequency: a new base); ``truncated`` (Giraffe's
truncated basis: keep high frequencies, clamp middle ones to ``rho``, zero the lowest).
The rotation uses the rotate-half layout of Hugging Face Llama checkpoints.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from zoo.configbase import config_dataclass

Kind = Literal["none", "linear", "ntk", "dynamic_ntk", "yarn", "abf", "truncated"]


@config_dataclass
class RopeScaling:
  """How RoPE frequencies are changed to reach beyond the training length.

  Attributes:
    kind: the variant (see module docstring).
    factor: target length / training length (linear, ntk, dynamic_ntk, yarn).
    original_max_len: the training context length (dynamic_ntk, yarn, truncated).
    base: the new base for ``abf``.
    beta_fast, beta_slow: YaRN's ramp bounds, in rotations over the training length.
    attention_factor: YaRN's logit temperature; default ``0.1 ln(factor) + 1``.
    low_cutoff, high_cutoff, rho: Giraffe truncation; frequencies above ``high_cutoff`` are kept,
      those between ``low_cutoff`` and ``high_cutoff`` become ``rho``, lower ones become 0.
      Defaults: ``high_cutoff = 2 pi / original_max_len`` (a full turn within the training length),
      ``low_cutoff = high_cutoff / 4``, ``rho = low_cutoff``.
  """

  kind: Kind = "none"
  factor: float = 1.0
  original_max_len: int = 0
  base: float | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  low_cutoff: float | None = None
  high_cutoff: float | None = None
  rho: float | None = None

  def __post_init__(self):
    if self.factor <= 0:
      raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
    if self.kind in ("dynamic_ntk", "yarn", "truncated") and self.original_max_len <= 0:
      raise ValueError(f"rope_scaling.kind={self.kind!r} needs original_max_len > 0")
    if self.kind == "abf" and (self.base is None or self.base <= 1):
      raise ValueError("rope_scaling.kind='abf' needs base > 1")


def inv_frequencies(
  head_dim: int, base: float, scaling: RopeScaling | None = None, seq_len: int | None = None
) -> tuple[np.ndarray, float]:
  """Returns (``inv_freq [head_dim // 2]`` float64, attention temperature ``mscale``).

  ``seq_len`` is the longest position in use (only ``dynamic_ntk`` depends on it).
  """
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  scaling = scaling or RopeScaling()
  exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  kind, f = scaling.kind, scaling.factor
  if kind == "abf":
    base = float(scaling.base)
  elif kind == "ntk":
    base = base * f ** (head_dim / (head_dim - 2))
  elif kind == "dynamic_ntk":
    n = seq_len or scaling.original_max_len
    if n > scaling.original_max_len:
      ratio = f * n / scaling.original_max_len - (f - 1)
      base = base * ratio ** (head_dim / (head_dim - 2))
  inv_freq = 1.0 / base**exponents
  mscale = 1.0
  if kind == "linear":
    inv_freq = inv_freq / f
  elif kind == "yarn":
    inv_freq, mscale = _yarn(inv_freq, head_dim, base, scaling)
  elif kind == "truncated":
    high = scaling.high_cutoff or 2 * math.pi / scaling.original_max_len
    low = scaling.low_cutoff or high / 4
    rho = scaling.rho if scaling.rho is not None else low
    inv_freq = np.where(inv_freq >= high, inv_freq, np.where(inv_freq > low, rho, 0.0))
  return inv_freq, mscale


def _yarn(inv_freq: np.ndarray, dim: int, base: float, s: RopeScaling) -> tuple[np.ndarray, float]:
  # YaRN (Peng et al. 2023), as in the reference implementation: dimensions that rotate fewer
  # than beta_slow times over the training length are interpolated, more than beta_fast kept.
  def correction_dim(rotations: float) -> float:
    return dim * math.log(s.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(correction_dim(s.beta_fast)), 0)
  high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)
  extrapolate = 1.0 - ramp
  scaled = inv_freq / s.factor * (1 - extrapolate) + inv_freq * extrapolate
  if s.attention_factor is not None:
    mscale = s.attention_factor
  else:
    mscale = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
  return scaled, mscale


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, mscale: float = 1.0):
  """Rotates ``x [B,T,H,Dh]`` by ``positions [B,T]`` (rotate-half layout); returns x's dtype."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  cos = (jnp.cos(angles) * mscale)[:, :, None, :]
  sin = (jnp.sin(angles) * mscale)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
