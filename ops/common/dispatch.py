"""Choosing an implementation of an op.

``implementation=None`` picks by ``jax.default_backend()``; a name runs exactly that
implementation (a call it cannot serve raises :class:`NotSupportedError`, never a silent
fallback); a sequence of names is tried in order and, if none can serve, the error lists every
failure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax


class NotSupportedError(ValueError):
  """An implementation cannot serve this call (shape, dtype, mask or platform)."""


def resolve_interpret(interpret: bool | None) -> bool:
  """``interpret=None`` means: interpret Pallas kernels only when running on CPU."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return bool(interpret)


def dispatch(
  op: str,
  implementations: Mapping[str, Callable[..., Any]],
  implementation: str | Sequence[str] | None,
  defaults: Mapping[str, Sequence[str]],
  *args: Any,
  **kwargs: Any,
) -> Any:
  """Runs ``op`` with the chosen implementation.

  Args:
    op: name of the op, for error messages.
    implementations: name -> callable taking ``*args, **kwargs``.
    implementation: ``None`` (by backend), one name, or a sequence of names tried in order.
    defaults: backend (``"cpu"``, ``"gpu"``, ``"tpu"``) -> names to try in order.
    *args: passed through.
    **kwargs: passed through.

  Raises:
    ValueError: an unknown implementation name.
    NotSupportedError: no chosen implementation can serve the call; the message lists each
      implementation's reason.
  """
  if implementation is None:
    names = tuple(defaults.get(jax.default_backend(), defaults.get("cpu", ("xla",))))
    explicit = False
  elif isinstance(implementation, str):
    names = (implementation,)
    explicit = True
  else:
    names = tuple(implementation)
    explicit = True
    if not names:
      raise ValueError(f"{op}: implementation=() names no implementation")
  for name in names:
    if name not in implementations:
      raise ValueError(
        f"{op}: unknown implementation {name!r}; choose from {sorted(implementations)}"
      )
  failures = []
  for name in names:
    try:
      return implementations[name](*args, **kwargs)
    except NotSupportedError as e:
      if explicit and len(names) == 1:
        raise NotSupportedError(f"{op}: implementation {name!r} cannot serve this call: {e}") from e
      failures.append(f"{name}: {e}")
  raise NotSupportedError(
    f"{op}: no implementation could serve this call:\n  " + "\n  ".join(failures)
  )
