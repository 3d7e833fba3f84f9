"""Frozen, keyword-only, validated config dataclasses (pydantic does the type checking)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

import pydantic
from pydantic import ConfigDict

T = TypeVar("T")

_CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=False, validate_default=True)


def config_dataclass(cls: type[T]) -> type[T]:
  """Decorator: a frozen keyword-only dataclass whose fields pydantic validates on creation.

  Unknown keys, wrong types and failed ``__post_init__`` checks raise at construction.
  """
  return pydantic.dataclasses.dataclass(frozen=True, kw_only=True, config=_CONFIG)(cls)


def field_names(cls: Any) -> list[str]:
  return [f.name for f in dataclasses.fields(cls)]


def closest(name: str, choices: list[str]) -> str | None:
  """The closest valid name to a misspelt one, or None."""
  match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
  return match[0] if match else None


def replace(config: T, **changes: Any) -> T:
  """``dataclasses.replace`` that re-validates and names an unknown key with a suggestion."""
  names = field_names(config)
  for key in changes:
    if key not in names:
      hint = closest(key, names)
      suffix = f" (did you mean {hint!r}?)" if hint else ""
      raise ValueError(f"{type(config).__name__} has no field {key!r}{suffix}")
  return dataclasses.replace(config, **changes)


def to_dict(config: Any) -> dict[str, Any]:
  """Nested plain-dict form (for YAML/JSON)."""
  return dataclasses.asdict(config)


# An op implementation in a config: a name, names tried in order, or None (the backend's default).
Implementation = str | tuple[str, ...] | None
