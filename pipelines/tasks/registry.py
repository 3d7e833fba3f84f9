"""Tasks by name, and depth x length grids of sources for retrieval heatmaps."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

from pipelines.errors import InputError
from pipelines.tasks.base import TaskSource
from pipelines.tasks.fact_chain import FactChain
from pipelines.tasks.mqar import MQAR
from pipelines.tasks.needle import VARIANTS, Needle
from pipelines.tasks.passkey import Passkey
from pipelines.tasks.selective_copy import SelectiveCopy
from pipelines.tasks.sequence_order import SequenceOrder
from pipelines.tasks.set_disjointness import SetDisjointness

_TASKS = {
  "passkey": Passkey,
  "needle": Needle,
  **{f"needle_{v}": functools.partial(Needle, variant=v) for v in VARIANTS},
  "mqar": MQAR,
  "set_disjointness": SetDisjointness,
  "sequence_order": SequenceOrder,
  "fact_chain": FactChain,
  "selective_copy": SelectiveCopy,
}


def list_tasks() -> list[str]:
  """Names accepted by ``get``."""
  return sorted(_TASKS)


def get(name: str, **params: Any) -> TaskSource:
  """The task source ``name`` built with ``params`` (``length`` is always required)."""
  if name not in _TASKS:
    close = difflib.get_close_matches(name, _TASKS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise KeyError(f"unknown task {name!r}{hint}; known: {', '.join(list_tasks())}")
  return _TASKS[name](**params)


class Cell(NamedTuple):
  depth: float
  length: int
  source: TaskSource


def grid(
  name: str, *, depths: Sequence[float], lengths: Sequence[int], **params: Any
) -> list[Cell]:
  """One source per (depth, length), lengths outer, for tasks with a ``depth`` parameter.

  Args:
    name: a task taking ``depth`` (``passkey``, ``needle*``).
    depths: needle depths in ``[0, 1]``.
    lengths: example lengths.
    **params: the other task parameters (the same ``seed`` in every cell).

  Returns:
    ``len(lengths) * len(depths)`` cells.
  """
  if not depths or not lengths:
    raise InputError("grid: depths and lengths must be non-empty")
  return [
    Cell(float(d), int(n), get(name, length=int(n), depth=float(d), **params))
    for n in lengths
    for d in depths
  ]
