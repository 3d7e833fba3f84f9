"""Orbax checkpoints of a run: train state, data-iterator state and metadata.

Saves are asynchronous and atomic (Orbax finalises a step directory only when every item is
written), the last ``keep`` steps are kept, and a step that fails to restore is refused with a
warning in favour of the previous one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Wraps an Orbax ``CheckpointManager`` over ``run_dir/checkpoints``."""

  def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True):
    self.directory = Path(run_dir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "data": ocp.JsonCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def has_optimizer(self, step: int | None = None) -> bool:
    """Whether ``step`` (default: the latest) holds an optimizer state; an imported run's step
    0 holds parameters only (its metadata says ``"optimizer": false``)."""
    step = self.latest_step() if step is None else step
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception:  # noqa: BLE001 - unreadable metadata: restore decides, as before
      return True
    return bool((meta["meta"] or {}).get("optimizer", True))

  def save(self, step: int, state: Any, data_state: dict | None, meta: dict) -> None:
    """Starts an (async) save of ``state`` (a pytree of arrays) at ``step``."""
    args = {
      "state": ocp.args.StandardSave(state),
      "data": ocp.args.JsonSave(data_state or {}),
      "meta": ocp.args.JsonSave(meta),
    }
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict, dict]:
    """Restores the newest restorable step (or ``step``); returns (step, state, data, meta).

    Raises:
      FileNotFoundError: no checkpoint could be restored.
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    errors = []
    for s in steps:
      try:
        args = {
          "state": ocp.args.StandardRestore(abstract_state),
          "data": ocp.args.JsonRestore(),
          "meta": ocp.args.JsonRestore(),
        }
        out = self.manager.restore(s, args=ocp.args.Composite(**args))
        return s, out["state"], out["data"] or None, out["meta"]
      except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
        log.warning("checkpoint step %s could not be restored (%s); trying an older one", s, e)
        errors.append(f"step {s}: {type(e).__name__}: {e}")
    raise FileNotFoundError(f"no restorable checkpoint in {self.directory}: {errors}")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing ``tree``, for restoring into it."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )
