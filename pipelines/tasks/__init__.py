"""Synthetic long-context tasks as deterministic grain sources, a registry and a scorer."""

from pipelines.tasks.base import TaskSource
from pipelines.tasks.fact_chain import FactChain
from pipelines.tasks.mqar import MQAR
from pipelines.tasks.needle import Needle
from pipelines.tasks.passkey import Passkey
from pipelines.tasks.registry import Cell, get, grid, list_tasks
from pipelines.tasks.scoring import evaluate, score
from pipelines.tasks.selective_copy import SelectiveCopy
from pipelines.tasks.sequence_order import SequenceOrder
from pipelines.tasks.set_disjointness import SetDisjointness

__all__ = [
  "MQAR",
  "Cell",
  "FactChain",
  "Needle",
  "Passkey",
  "SelectiveCopy",
  "SequenceOrder",
  "SetDisjointness",
  "TaskSource",
  "evaluate",
  "get",
  "grid",
  "list_tasks",
  "score",
]
