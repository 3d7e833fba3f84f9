"""Metrics sinks: ``metrics.jsonl`` in the run directory and TensorBoard event files.

``metrics.jsonl`` is append-only: it is never truncated or rewritten. A resumed run appends a
``{"resume": S}`` marker, and :func:`read` drops the records after step ``S`` written before the
marker (they came from a run that crashed after its last checkpoint), so the history read back is
the one a run without the crash would have written. A line that is not valid JSON (a torn write,
a stray edit) is skipped with a warning; every other line is kept.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipelines.errors import InputError

log = logging.getLogger(__name__)


class MetricsWriter:
  """Appends one JSON object per record; mirrors scalars to TensorBoard (``run_dir/tb``)."""

  def __init__(self, run_dir: str | Path, *, resume_step: int = 0, tensorboard: bool = True):
    self.path = Path(run_dir) / "metrics.jsonl"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = self.path.open("ab")
    if self._file.tell() > 0:
      with self.path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        torn = f.read(1) != b"\n"
      if torn:
        # A crash mid-line: end that line so the next record starts on its own.
        self._file.write(b"\n")
      # Records after the restored step belong to a run that crashed later; the marker tells
      # ``read`` to drop them, so the file keeps one history without being rewritten.
      self._append({"resume": int(resume_step)})
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

  def _append(self, record: dict[str, Any]) -> None:
    self._file.write((json.dumps(record) + "\n").encode())
    self._file.flush()

  def write(self, step: int, **values: Any) -> None:
    record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
    self._append(record)
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read(path: str | Path) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` in step order of the surviving history.

  Bad lines (not a JSON object, or invalid UTF-8) are skipped and reported with one warning
  each; ``{"resume": S}`` markers drop the earlier records after step ``S``.
  """
  path = Path(path)
  if not path.exists():
    return []
  out: list[dict[str, Any]] = []
  for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
    if not raw.strip():
      continue
    try:
      record = json.loads(raw.decode("utf-8"))
      if not isinstance(record, dict):
        raise InputError("not a JSON object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
      log.warning("%s:%d: skipped a bad line (%s)", path, lineno, type(e).__name__)
      continue
    if "resume" in record and "step" not in record:
      resume = record["resume"]
      out = [r for r in out if r.get("step", 0) <= resume]
      continue
    out.append(record)
  return out


def _plain(v: Any) -> Any:
  if hasattr(v, "item"):
    return v.item()
  return v
