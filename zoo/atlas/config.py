"""Configuration of ATLAS: the Titans config with ATLAS's memory options as defaults."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.titans.config import TitansConfig


@config_dataclass
class AtlasConfig(TitansConfig):
  """ATLAS (and its relatives) as a configuration of the Titans code.

  Every field is a ``TitansConfig`` field (see there); the defaults differ:
  ``omega_window`` 4 (the Omega rule: the inner loss covers the last c tokens),
  ``feature_map`` "poly2" (degree-2 polynomial features of keys and queries, a Taylor
  approximation of the exponential kernel; "poly3" / "poly4" go further) and ``optimizer``
  "muon" (Newton-Schulz orthogonalised momentum), on the memory-only stack (``variant``
  "lmm"). ``learn_omega_weights`` (ATLAS's input-dependent gamma_t) stays False by default so
  that an Atlas with Titans' options is the Titans model; set it True for the paper's gated
  Omega rule.

  Named relatives, by override:

  - OmegaNet = ``optimizer="momentum"``.
  - DeepTransformer (Hebbian) = ``objective="dot", optimizer="momentum", omega_window=1``
    with a polynomial ``feature_map`` ("poly2" ... "poly4") standing in for the exponential
    kernel and ``memory_depth`` 2; with depth 1, theta = 1 and no momentum / decay its memory
    is unnormalised linear attention over those features (softmax's normaliser is not
    modelled; exact softmax attention, the kernel's limit, is the ``transformer`` family).
  - Deep Omega Transformer (DeepTransformers with the Omega rule) = ``objective="l2",
    optimizer="momentum"`` with ``omega_window`` covering the context it should see and a
    polynomial ``feature_map``.
  - The hybrids are ``variant="mag"`` / ``"mal"`` / ``"mac"``.
  """

  family: Literal["atlas"] = "atlas"
  variant: Literal["mac", "mag", "mal", "lmm"] = "lmm"
  omega_window: int = 4
  feature_map: Literal["identity", "poly2", "poly3", "poly4", "elu1"] = "poly2"
  optimizer: Literal["momentum", "muon"] = "muon"


def _preset(fields: dict, overrides: dict) -> AtlasConfig:
  return AtlasConfig(**{**fields, **overrides})


def tiny(**overrides) -> AtlasConfig:
  """For tests and the CPU demo: d_model 64, 2 layers, head_dim 8 (poly2 makes F = 73)."""
  return _preset(
    {
      "d_model": 64,
      "n_layers": 2,
      "n_heads": 8,
      "d_ff": 192,
      "max_len": 512,
      "n_persistent": 4,
      "window": 16,
      "segment_size": 16,
      "chunk_size": 8,
    },
    overrides,
  )


def small(**overrides) -> AtlasConfig:
  """~25M-class layout with the byte vocabulary."""
  return _preset(
    {
      "d_model": 512,
      "n_layers": 8,
      "n_heads": 16,
      "d_ff": 1408,
      "max_len": 2048,
      "n_persistent": 16,
      "window": 256,
      "segment_size": 256,
      "chunk_size": 16,
    },
    overrides,
  )


def base(**overrides) -> AtlasConfig:
  """The paper's smallest-run class (GPU/TPU)."""
  return _preset(
    {
      "d_model": 768,
      "n_layers": 12,
      "n_heads": 24,
      "d_ff": 2048,
      "max_len": 4096,
      "n_persistent": 16,
      "window": 512,
      "segment_size": 512,
      "chunk_size": 64,
      "dtype": "bfloat16",
    },
    overrides,
  )


PRESETS = {"tiny": tiny, "small": small, "base": base}
