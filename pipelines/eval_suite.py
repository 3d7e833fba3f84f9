"""``memzoo eval RUN --suite NAME``: held-out perplexity and the synthetic task suite, as tables.

Suites: ``heldout`` (loss and bits per byte), ``synthetic`` (every task at the training length
and twice it, scored by exact match on the answer spans), ``all`` (both). Results go to
``RUN/eval.json`` and a Markdown table in ``RUN/report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import evaluate, report
from pipelines.errors import InputError
from pipelines.rundir import atomic_write_text
from pipelines.streaming import ChunkedRunner
from pipelines.tasks import evaluate as evaluate_task
from pipelines.tasks import get as get_task
from pipelines.train import load_run

SUITES = ("heldout", "synthetic", "all")


def task_specs(train_len: int, corpus: np.ndarray) -> list[tuple[str, dict[str, Any]]]:
  """(task name, parameters) of the synthetic suite at a given length."""
  return [
    ("passkey", {}),
    ("needle_single", {"corpus": corpus}),
    ("needle_multi_key", {"corpus": corpus}),
    ("mqar", {"num_pairs": max(2, min(16, train_len // 16)), "token_range": (0, 64)}),
    ("set_disjointness", {}),
    ("sequence_order", {"corpus": corpus}),
    ("fact_chain", {"hops": 1}),
    ("selective_copy", {}),
  ]


def synthetic(run_dir: str | Path, *, factors=(1, 2, 4), n: int = 32) -> list[dict[str, Any]]:
  """Accuracy per task x length for a run's latest checkpoint (streamed in chunks of L)."""
  exp, model, _ = load_run(run_dir)
  from pipelines.extrapolate import heldout_stream

  corpus = heldout_stream(exp)
  train_len = exp.data.seq_len
  runner = ChunkedRunner(model, train_len)
  predict = lambda x: runner.run(x)[0]
  rows = []
  for factor in factors:
    length = int(train_len * factor)
    for name, params in task_specs(train_len, corpus):
      try:
        source = get_task(name, length=length, seed=1234, **params)
      except ValueError as e:  # the task does not fit this length
        rows.append(
          {
            "task": name,
            "length": length,
            "accuracy": None,
            "n": 0,
            "chance": "too short",
            "note": str(e),
          }
        )
        continue
      res = evaluate_task(predict, source, min(n, len(source)), batch_size=8)
      rows.append(
        {
          "task": name,
          "length": length,
          "accuracy": res["accuracy"],
          "n": res["n"],
          "chance": source.chance,
        }
      )
  return rows


def run(run_dir: str | Path, suite: str = "all", *, n: int = 32, batches: int | None = None):
  """Runs a suite, writes ``eval.json`` and the report section; returns the results."""
  if suite not in SUITES:
    raise InputError(f"unknown suite {suite!r}; choose from {SUITES}")
  run_dir = Path(run_dir)
  out: dict[str, Any] = {}
  if suite in ("heldout", "all"):
    out["heldout"] = evaluate.heldout(run_dir, batches=batches)
  if suite in ("synthetic", "all"):
    out["synthetic"] = synthetic(run_dir, n=n)
  atomic_write_text(run_dir / "eval.json", json.dumps(out, indent=2))
  body = []
  if "heldout" in out:
    h = out["heldout"]
    body += [
      report.markdown_table(
        [
          {"metric": "held-out loss (nats/token)", "value": h["heldout_loss"]},
          {"metric": "held-out bits per byte", "value": h["heldout_bits_per_byte"]},
          {"metric": "unigram bits per byte", "value": h["unigram_bits_per_byte"]},
        ]
      ),
      "",
    ]
  if "synthetic" in out:
    body += [report.markdown_table(out["synthetic"], ["task", "length", "accuracy", "n", "chance"])]
  path = run_dir / "report.md"
  if not path.exists():
    atomic_write_text(path, f"# memzoo run report: `{run_dir.name}`\n\n")
  report.write_section(path, f"Evaluation suite: {suite}", "\n".join(body))
  return out


def format_rows(out: dict[str, Any]) -> str:
  lines = []
  if "heldout" in out:
    for k, v in out["heldout"].items():
      lines.append(f"{k:28s} {v}")
  if "synthetic" in out:
    lines.append(
      report.markdown_table(out["synthetic"], ["task", "length", "accuracy", "n", "chance"])
    )
  return "\n".join(lines)
