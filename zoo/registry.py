"""The model registry: family name -> (config class, presets, model class)."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from flax import nnx

from zoo.configbase import closest


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  module: str  # "zoo.<family>", holding config.PRESETS and a model class
  model_class: str
  description: str


_FAMILIES: dict[str, Family] = {}


def register(name: str, module: str, model_class: str, description: str) -> None:
  """Adds a family; ``module`` must provide ``config.PRESETS`` and ``model.<model_class>``."""
  _FAMILIES[name] = Family(name, module, model_class, description)


def list_models() -> list[str]:
  """Registered family names."""
  return sorted(_FAMILIES)


def family(name: str) -> Family:
  if name not in _FAMILIES:
    hint = closest(name, list(_FAMILIES))
    suffix = f" (did you mean {hint!r}?)" if hint else ""
    raise ValueError(f"unknown model {name!r}{suffix}; registered: {list_models()}")
  return _FAMILIES[name]


def presets(name: str) -> dict[str, Callable[..., Any]]:
  return importlib.import_module(f"{family(name).module}.config").PRESETS


def config(name: str, preset: str = "tiny", **overrides: Any) -> Any:
  """Builds a validated config: ``zoo.config("transformer", "tiny", d_model=64)``."""
  table = presets(name)
  if preset not in table:
    hint = closest(preset, list(table))
    suffix = f" (did you mean {hint!r}?)" if hint else ""
    raise ValueError(f"model {name!r} has no preset {preset!r}{suffix}; presets: {sorted(table)}")
  cfg = table[preset]()
  fields = [f.name for f in dataclasses.fields(cfg)]
  for key in overrides:
    if key not in fields:
      hint = closest(key, fields)
      suffix = f" (did you mean {hint!r}?)" if hint else ""
      raise ValueError(f"model {name!r} has no config key {key!r}{suffix}")
  return table[preset](**overrides)


def model_class(name: str) -> type:
  """The model class of a family (class attributes such as ``accepts_segment_ids``)."""
  fam = family(name)
  return getattr(importlib.import_module(f"{fam.module}.model"), fam.model_class)


def build(cfg: Any, *, rngs: nnx.Rngs | int = 0) -> nnx.Module:
  """Instantiates the model of a config (its ``family`` field names the family)."""
  if isinstance(rngs, int):
    rngs = nnx.Rngs(rngs)
  return model_class(cfg.family)(cfg, rngs=rngs)
