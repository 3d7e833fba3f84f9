"""The run report: ``report.md`` with a loss-curve PNG, held-out numbers and samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipelines.rundir import atomic_write_text


def loss_curve(history: list[dict[str, Any]], path: Path, title: str) -> Path:
  """Training loss (and held-out loss where measured) against step."""
  fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
  steps = [r["step"] for r in history if "loss" in r]
  ax.plot(steps, [r["loss"] for r in history if "loss" in r], label="train loss")
  ev = [r for r in history if "eval_loss" in r]
  if ev:
    ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def write_section(report: Path, heading: str, body: str) -> None:
  """Replaces (or appends) one ``## heading`` section of a Markdown report."""
  text = report.read_text() if report.exists() else ""
  marker = f"## {heading}\n"
  section = f"{marker}\n{body.rstrip()}\n\n"
  if marker in text:
    start = text.index(marker)
    nxt = text.find("\n## ", start + len(marker))
    text = text[:start] + section + (text[nxt + 1 :] if nxt != -1 else "")
  else:
    text = text + section
  atomic_write_text(report, text)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
  if not rows:
    return "(no rows)"
  columns = columns or list(rows[0])
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)
