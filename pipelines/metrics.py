"""Metrics sinks: ``metrics.jsonl`` in the run directory and TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
  """Appends one JSON object per record; mirrors scalars to TensorBoard (``run_dir/tb``)."""

  def __init__(self, run_dir: str | Path, *, resume_step: int = 0, tensorboard: bool = True):
    self.path = Path(run_dir) / "metrics.jsonl"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      # Records after the restored step belong to a run that crashed later; drop them so the
      # file holds one history.
      keep = [r for r in read(self.path) if r.get("step", 0) <= resume_step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    self._file = self.path.open("a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

  def write(self, step: int, **values: Any) -> None:
    record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read(path: str | Path) -> list[dict[str, Any]]:
  path = Path(path)
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        break  # a torn last line from a crash
  return out


def _plain(v: Any) -> Any:
  if hasattr(v, "item"):
    return v.item()
  return v
