"""Orbax checkpoints of a run: train state, data-iterator state and metadata.

Saves are asynchronous and atomic (Orbax finalises a step directory only when every item is
written) and the last ``keep`` steps are kept. A step counts as committed only once its
``sha256.json`` manifest (the SHA-256 of every file in the step) is written after the save; the
state is checked finite before a save starts. Restoring verifies the manifest first: a step
without one, with a file that is missing or does not match, or whose parameters are not finite
is refused with one warning line, and the previous step is tried. During training such a step is
also moved aside (``checkpoints/step_N.corrupt-<time>``, kept for inspection) so the run can
save that step number again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pipelines.errors import InputError, MissingFileError, UserError
from pipelines.rundir import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "sha256.json"
MANIFEST_FORMAT = "memzoo-checkpoint-sha256"


class CorruptCheckpointError(MissingFileError):
  """No step of a run could be restored intact (each step's problem is named)."""


class NonFiniteStateError(UserError, FloatingPointError):
  """A state holding NaN/inf was about to be checkpointed or exported."""

  label = "non-finite values"


def sha256_file(path: str | Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def digests(directory: Path) -> dict[str, str]:
  """``{relative path: sha256}`` of every file under ``directory`` except the manifest."""
  out = {}
  for f in sorted(directory.rglob("*")):
    rel = f.relative_to(directory).as_posix()
    if f.is_file() and rel != MANIFEST:
      out[rel] = sha256_file(f)
  return out


def write_manifest(step_dir: Path, step: int) -> None:
  body = {"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": digests(step_dir)}
  atomic_write_text(step_dir / MANIFEST, json.dumps(body, indent=1) + "\n")


def verify_step(step_dir: Path) -> str | None:
  """None if every file of the step matches its manifest, else the first problem found."""
  path = step_dir / MANIFEST
  if not path.is_file():
    return "no checksum manifest (the save never committed)"
  try:
    manifest = json.loads(path.read_text())
    files = manifest["files"]
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
      raise InputError("not a checksum manifest")
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"checksum manifest unreadable ({type(e).__name__})"
  for rel, want in files.items():
    f = step_dir / rel
    if not f.is_file():
      return f"file {rel} is missing"
    if sha256_file(f) != want:
      return f"file {rel} does not match its SHA-256 (corrupt or overwritten)"
  return None


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths (``['params']['w']``) of the floating-point leaves of ``tree`` holding NaN/inf."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  floats = [(p, x) for p, x in flat if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not floats:
    return []
  ok = np.asarray(jax.device_get(_finite_flags([x for _, x in floats])))
  return [jax.tree_util.keystr(p) for (p, _), good in zip(floats, ok) if not good]


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


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
    self.primary = jax.process_index() == 0
    self._async = async_save
    self._uncommitted: list[int] = []

  def step_dir(self, step: int) -> Path:
    return self.directory / str(step)

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
    """Starts an (async) save of ``state`` (a pytree of arrays) at ``step``.

    Raises:
      NonFiniteStateError: ``state`` holds NaN/inf (nothing is written).
    """
    bad = nonfinite_leaves(state)
    if bad:
      raise NonFiniteStateError(
        f"refusing to checkpoint step {step}: non-finite values in {', '.join(bad[:3])}"
        + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
      )
    self.commit()
    args = {
      "state": ocp.args.StandardSave(state),
      "data": ocp.args.JsonSave(data_state or {}),
      "meta": ocp.args.JsonSave(meta),
    }
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    self._uncommitted.append(step)
    if not self._async:
      self.commit()

  def commit(self) -> None:
    """Waits for pending saves and writes their checksum manifests (which commits them)."""
    if not self._uncommitted:
      return
    self.manager.wait_until_finished()
    if self.primary:
      for s in self._uncommitted:
        if self.step_dir(s).is_dir():  # not already rotated out by max_to_keep
          write_manifest(self.step_dir(s), s)
    self._uncommitted = []
    _barrier("memzoo-checkpoint-commit")

  def poll(self) -> None:
    """Commits a finished async save without waiting (call once per step; single process)."""
    if self._uncommitted and jax.process_count() == 1:
      if not self.manager.is_saving_in_progress():
        self.commit()

  def check(self, step: int) -> str | None:
    """None if ``step`` is committed and intact, else its problem."""
    return verify_step(self.step_dir(step))

  def set_aside(self, step: int, problem: str) -> Path:
    """Renames an unusable step out of Orbax's view (kept); returns its new path."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dest = self.directory / f"step_{step}.corrupt-{stamp}"
    n = 1
    while dest.exists():
      dest = self.directory / f"step_{step}.corrupt-{stamp}-{n}"
      n += 1
    if self.primary:
      self.step_dir(step).rename(dest)
    log.warning("checkpoint step %d is unusable (%s); moved aside to %s", step, problem, dest)
    return dest

  def restore(
    self, abstract_state: Any, step: int | None = None, *, set_aside: bool = False
  ) -> tuple[int, Any, dict, dict] | None:
    """Restores the newest intact step (or ``step``); returns (step, state, data, meta).

    A step that fails its checksums or holds non-finite values is skipped with a warning; with
    ``set_aside`` (training, which holds the run's lock) it is also moved aside, and None is
    returned when no intact step is left.

    Raises:
      CorruptCheckpointError: without ``set_aside``, no requested step is intact.
      ValueError: an intact step does not fit ``abstract_state`` (the model config changed).
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    problems = []
    try:
      for s in steps:
        problem = self.check(s)
        if problem is None:
          try:
            args = {
              "state": ocp.args.StandardRestore(abstract_state),
              "data": ocp.args.JsonRestore(),
              "meta": ocp.args.JsonRestore(),
            }
            out = self.manager.restore(s, args=ocp.args.Composite(**args))
          except Exception as e:  # noqa: BLE001 - files verified: the target does not fit
            raise InputError(
              f"checkpoint step {s} in {self.directory} is intact but does not fit this "
              f"model ({type(e).__name__}: {str(e).splitlines()[0][:200]}); was the model "
              "config changed?"
            ) from None
          bad = nonfinite_leaves(out["state"])
          if not bad:
            return s, out["state"], out["data"] or None, out["meta"]
          problem = f"non-finite values in {', '.join(bad[:3])}"
        problems.append(f"step {s}: {problem}")
        _barrier(f"memzoo-check-{s}")
        if set_aside:
          self.set_aside(s, problem)
        else:
          log.warning("checkpoint step %d cannot be restored (%s); trying an older one", s, problem)
    finally:
      if set_aside and problems:
        _barrier("memzoo-set-aside")
        self.manager.reload()
    if set_aside:
      return None
    raise CorruptCheckpointError(
      f"no restorable checkpoint in {self.directory}: " + "; ".join(problems or ["no steps"])
    )

  def wait(self) -> None:
    self.commit()

  def close(self) -> None:
    self.commit()
    self.manager.close()


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing ``tree``, for restoring into it."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )
