"""Rotary position embeddings and their scaling variants for length extrapolation.

Variants (``RopeScaling.kind``): ``none``; ``linear`` (position interpolation, Chen et al.);
``ntk`` (NTK-aware base scaling); ``dynamic_ntk`` (NTK scaling that grows with the current
length); ``yarn`` (per-frequency ramp between interpolation and extrapolation, with YaRN's
attention temperature); ``abf`` (adjusted base frequency: a new base); ``truncated`` (Giraffe's
truncated basis: keep high frequencies, clamp middle ones to ``rho``, zero the lowest);
``llama3`` (Llama 3.1's per-wavelength interpolation); ``longrope`` (per-dimension factors, a
short set up to the training length and a long set beyond it).
The rotation uses the rotate-half layout of Hugging Face Llama checkpoints, and ``dynamic_ntk``,
``yarn``, ``llama3`` and ``longrope`` follow ``transformers``' ``modeling_rope_utils`` formula
for formula, so imported checkpoints rotate exactly as they were trained.

``dynamic_ntk`` and ``longrope`` depend on the current sequence length: a decode step rotates
its new tokens with the frequencies of the length reached so far (``seq_len`` may then be a
traced ``[B]`` array), keys already cached keep theirs, as in ``transformers``' generation.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from zoo.configbase import config_dataclass

Kind = Literal[
  "none", "linear", "ntk", "dynamic_ntk", "yarn", "abf", "truncated", "llama3", "longrope"
]
# Variants whose frequencies depend on the current sequence length.
LENGTH_DEPENDENT = ("dynamic_ntk", "longrope")


@config_dataclass
class RopeScaling:
  """How RoPE frequencies are changed to reach beyond the training length.

  Attributes:
    kind: the variant (see module docstring).
    factor: target length / training length (linear, ntk, dynamic_ntk, yarn, llama3, longrope).
    original_max_len: the training context length (dynamic_ntk, yarn, truncated, llama3,
      longrope).
    base: the new base for ``abf``.
    beta_fast, beta_slow: YaRN's ramp bounds, in rotations over the training length.
    truncate: YaRN rounds the ramp bounds to whole dimensions (floor/ceil) when true.
    attention_factor: the logit temperature applied to cos and sin (yarn, longrope); default
      for yarn ``0.1 ln(factor) + 1``, or ``mscale(factor, mscale) / mscale(factor,
      mscale_all_dim)`` when both are set; for longrope ``sqrt(1 + ln(factor) / ln(original))``.
    mscale, mscale_all_dim: YaRN's (DeepSeek-style) temperature numerator and denominator.
    low_freq_factor, high_freq_factor: llama3's wavelength bounds, as divisors of
      ``original_max_len``: longer wavelengths are interpolated by ``factor``, shorter kept,
      between them a smooth mix.
    short_factor, long_factor: longrope's per-dimension divisors (``head_dim // 2`` each) for
      sequences up to / beyond ``original_max_len``.
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
  truncate: bool = True
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  short_factor: tuple[float, ...] | None = None
  long_factor: tuple[float, ...] | None = None
  low_cutoff: float | None = None
  high_cutoff: float | None = None
  rho: float | None = None

  def __post_init__(self):
    if self.factor <= 0:
      raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
    if (
      self.kind in ("dynamic_ntk", "yarn", "truncated", "llama3", "longrope")
      and self.original_max_len <= 0
    ):
      raise ValueError(f"rope_scaling.kind={self.kind!r} needs original_max_len > 0")
    if self.kind == "abf" and (self.base is None or self.base <= 1):
      raise ValueError("rope_scaling.kind='abf' needs base > 1")
    if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(
        f"rope_scaling.kind='llama3' needs high_freq_factor > low_freq_factor, got "
        f"{self.high_freq_factor} <= {self.low_freq_factor}"
      )
    if self.kind == "longrope" and (self.short_factor is None or self.long_factor is None):
      raise ValueError("rope_scaling.kind='longrope' needs short_factor and long_factor")


def inv_frequencies(
  head_dim: int, base: float, scaling: RopeScaling | None = None, seq_len: int | None = None
) -> tuple[np.ndarray, float]:
  """Returns (``inv_freq [head_dim // 2]`` float64, attention temperature ``mscale``).

  ``seq_len`` is the longest position in use (only ``dynamic_ntk`` and ``longrope`` depend on
  it; ``None`` means the training length).
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
  elif kind == "llama3":
    inv_freq = _llama3(inv_freq, scaling)
  elif kind == "longrope":
    long = seq_len is not None and seq_len > scaling.original_max_len
    inv_freq, mscale = _longrope(inv_freq, head_dim, scaling, long)
  elif kind == "truncated":
    high = scaling.high_cutoff or 2 * math.pi / scaling.original_max_len
    low = scaling.low_cutoff or high / 4
    rho = scaling.rho if scaling.rho is not None else low
    inv_freq = np.where(inv_freq >= high, inv_freq, np.where(inv_freq > low, rho, 0.0))
  return inv_freq, mscale


def length_frequencies(
  head_dim: int, base: float, scaling: RopeScaling, seq_len: jax.Array
) -> tuple[jax.Array, float]:
  """``inv_frequencies`` for a traced per-sequence length ``seq_len [B]``.

  Returns ``(inv_freq [B, head_dim // 2] float32, mscale)``; used by decode steps of the
  length-dependent variants (``dynamic_ntk``, ``longrope``).
  """
  n = jnp.asarray(seq_len)
  orig = scaling.original_max_len
  if scaling.kind == "dynamic_ntk":
    f = scaling.factor
    ratio = f * jnp.maximum(n, orig).astype(jnp.float32) / orig - (f - 1)
    new_base = base * ratio ** (head_dim / (head_dim - 2))
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / new_base[:, None] ** exponents[None, :], 1.0
  if scaling.kind == "longrope":
    short, mscale = inv_frequencies(head_dim, base, scaling, orig)
    long, _ = inv_frequencies(head_dim, base, scaling, orig + 1)
    pick = (n > orig)[:, None]
    return jnp.where(pick, jnp.asarray(long, jnp.float32), jnp.asarray(short, jnp.float32)), mscale
  raise ValueError(f"rope_scaling.kind={scaling.kind!r} does not depend on the sequence length")


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
  return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0


def _yarn(inv_freq: np.ndarray, dim: int, base: float, s: RopeScaling) -> tuple[np.ndarray, float]:
  # YaRN (Peng et al. 2023), as in the reference implementation: dimensions that rotate fewer
  # than beta_slow times over the training length are interpolated, more than beta_fast kept.
  def correction_dim(rotations: float) -> float:
    return dim * math.log(s.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)
  extrapolate = 1.0 - ramp
  scaled = inv_freq / s.factor * (1 - extrapolate) + inv_freq * extrapolate
  if s.attention_factor is not None:
    mscale = s.attention_factor
  elif s.mscale and s.mscale_all_dim:
    mscale = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
  else:
    mscale = _yarn_mscale(s.factor)
  return scaled, mscale


def _llama3(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
  # Llama 3.1: wavelengths longer than original / low_freq_factor are interpolated by factor,
  # shorter than original / high_freq_factor kept, and a smooth mix in between.
  low_wavelen = s.original_max_len / s.low_freq_factor
  high_wavelen = s.original_max_len / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  out = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor
  )
  smoothed = (1 - smooth) * out / s.factor + smooth * out
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, out)


def _longrope(
  inv_freq: np.ndarray, dim: int, s: RopeScaling, long: bool
) -> tuple[np.ndarray, float]:
  factors = np.asarray(s.long_factor if long else s.short_factor, np.float64)
  if factors.shape != (dim // 2,):
    raise ValueError(
      f"rope_scaling: longrope factors need {dim // 2} entries (head_dim / 2), got {factors.size}"
    )
  if s.attention_factor is not None:
    mscale = s.attention_factor
  elif s.factor <= 1.0:
    mscale = 1.0
  else:
    mscale = math.sqrt(1 + math.log(s.factor) / math.log(s.original_max_len))
  return inv_freq / factors, mscale


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq, mscale: float = 1.0):
  """Rotates ``x [B,T,H,Dh]`` by ``positions [B,T]`` (rotate-half layout); returns x's dtype.

  ``inv_freq`` is ``[Dh/2]`` (shared) or ``[B, Dh/2]`` (per sequence, see
  ``length_frequencies``).
  """
  freq = jnp.asarray(inv_freq, jnp.float32)
  if freq.ndim == 2:
    freq = freq[:, None, :]
  angles = positions.astype(jnp.float32)[..., None] * freq
  cos = (jnp.cos(angles) * mscale)[:, :, None, :]
  sin = (jnp.sin(angles) * mscale)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
