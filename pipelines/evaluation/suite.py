"""``memzoo eval RUN --suite NAME``: held-out perplexity, the synthetic task suite and the
training-free memory grid, as tables.

Suites: ``heldout`` (loss and bits per byte), ``synthetic`` (every task at the training length
and twice it, scored by exact match on the answer spans), ``all`` (both), and ``memory``:
passkey and needle grids (depth x length, 1x-8x the trained length) for plain attention,
StreamingLLM, InfLLM, EM-LLM and DuoAttention on the same weights, with accuracy and KV memory
per method (a transformer run, e.g. one made by ``memzoo import-hf``). Every suite builds its
texts with the run's tokenizer (``pipelines.data.hf_tokenizer.load_tokenizer``); lengths are
in tokens, with the characters they hold alongside. Results go to ``RUN/eval.json``
(``RUN/memory.json`` for ``memory``) and a section of ``RUN/report.md`` (plus ``RUN/memory.png``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import report
from pipelines.data.hf_tokenizer import load_tokenizer
from pipelines.errors import InputError
from pipelines.evaluation import heldout as evaluate
from pipelines.evaluation import memories
from pipelines.evaluation.chunked import ChunkedRunner
from pipelines.run import load_run
from pipelines.rundir import atomic_write_text
from pipelines.tasks import evaluate as evaluate_task
from pipelines.tasks import get as get_task

SUITES = ("heldout", "synthetic", "all", "memory")
MEMORY_TASKS = ("passkey", "needle_single")


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


def mean_chars(source: Any, tok: Any, n: int = 4) -> float:
  """Mean characters of the first ``n`` examples' text (padding dropped): a task's length in
  characters, next to its length in tokens."""
  out = []
  for i in range(min(n, len(source))):
    ex = source[i]
    out.append(len(tok.decode(ex["inputs"][ex["segment_ids"] > 0])))
  return float(np.mean(out))


def synthetic(run_dir: str | Path, *, factors=(1, 2, 4), n: int = 32) -> list[dict[str, Any]]:
  """Accuracy per task x length for a run's latest checkpoint (streamed in chunks of L)."""
  exp, model, _ = load_run(run_dir)
  from pipelines.evaluation.extrapolate import heldout_stream
  from pipelines.evaluation.generate import trained_length

  tok = load_tokenizer(Path(run_dir))
  corpus = heldout_stream(exp, tok)
  train_len = trained_length(exp)
  runner = ChunkedRunner(model, train_len)
  predict = lambda x: runner.run(x)[0]
  rows = []
  for factor in factors:
    length = int(train_len * factor)
    for name, params in task_specs(train_len, corpus):
      try:
        source = get_task(name, length=length, seed=1234, tokenizer=tok, **params)
      except ValueError as e:  # the task does not fit this length
        rows.append(
          {
            "task": name,
            "length": length,
            "chars": None,
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
          "chars": mean_chars(source, tok),
          "accuracy": res["accuracy"],
          "n": res["n"],
          "chance": source.chance,
        }
      )
  return rows


def memory_grid(
  run_dir: str | Path,
  *,
  methods: Sequence[str] = memories.METHODS,
  factors: Sequence[float] = (1, 2, 4, 8),
  depths: Sequence[float] = (0.0, 0.5, 1.0),
  tasks: Sequence[str] = MEMORY_TASKS,
  n: int = 8,
  task_params: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
  """Passkey / needle accuracy per method x task x length x depth, and KV memory per method x
  length, for a transformer run with its own tokenizer.

  Lengths are ``factor * L`` tokens, ``L`` the trained length (``generate.trained_length``).
  Every method wraps the same parameters (``pipelines.evaluation.memories``) and streams each input
  through its decode state in chunks. Cells whose task does not fit the length are skipped.
  ``task_params``: extra parameters per task (e.g. ``{"passkey": {"num_digits": 3}}``).
  """
  from pipelines.evaluation.extrapolate import heldout_stream
  from pipelines.evaluation.generate import duo_gate_batches, trained_length

  run_dir = Path(run_dir)
  exp, model, step = load_run(run_dir)
  tok = load_tokenizer(run_dir)
  train_len = trained_length(exp)
  lengths = sorted({int(train_len * f) for f in factors})
  corpus = heldout_stream(exp, tok) if any(t.startswith("needle") for t in tasks) else None
  task_params = task_params or {}
  sources: dict[tuple[str, int, float], Any] = {}
  for task in tasks:
    params = dict(task_params.get(task, {}))
    if task.startswith("needle"):
      params["corpus"] = corpus
    for length in lengths:
      for depth in depths:
        try:
          sources[task, length, depth] = get_task(
            task, length=length, depth=depth, seed=0, tokenizer=tok, **params
          )
        except ValueError:  # the needle and question do not fit in this length
          pass
  cells, memory, used = [], [], {}
  for method in methods:
    batches = duo_gate_batches(tok, train_len) if method == "duo" else None
    wrapped, opts = memories.wrap(model, method, train_len, lengths[-1], duo_batches=batches)
    used[method] = opts
    runner = ChunkedRunner(wrapped, memories.chunk_size(wrapped, train_len))
    predict = lambda x, runner=runner: runner.run(x)[0]
    for length in lengths:
      memory.append(
        {"method": method, "length": length, "kv_bytes": memories.state_bytes(wrapped, length)}
      )
    for (task, length, depth), src in sources.items():
      res = evaluate_task(predict, src, n, batch_size=min(n, 8))
      cells.append(
        {
          "method": method,
          "task": task,
          "length": length,
          "chars": mean_chars(src, tok),
          "depth": depth,
          **res,
        }
      )
  return {
    "step": step,
    "train_len": train_len,
    "tokenizer": getattr(tok, "name", "byte"),
    "vocab_size": int(tok.vocab_size),
    "lengths": lengths,
    "methods": list(methods),
    "options": used,
    "cells": cells,
    "memory": memory,
  }


def memory_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per method x task x length: accuracy (mean over depths), characters, KV MiB."""
  kv = {(m["method"], m["length"]): m["kv_bytes"] for m in res["memory"]}
  groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
  for c in res["cells"]:
    groups.setdefault((c["method"], c["task"], c["length"]), []).append(c)
  rows = []
  for (method, task, length), cs in groups.items():
    rows.append(
      {
        "method": method,
        "task": task,
        "tokens": length,
        "x L": round(length / res["train_len"], 2),
        "chars": round(float(np.mean([c["chars"] for c in cs])), 1),
        "accuracy": float(np.mean([c["accuracy"] for c in cs])),
        "n": int(sum(c["n"] for c in cs)),
        "KV MiB": kv[method, length] / 2**20,
      }
    )
  return rows


def memory_plot(res: dict[str, Any], path: Path, title: str) -> Path:
  """Accuracy (one panel per task) and KV memory against length, one line per method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = memory_rows(res)
  tasks = sorted({r["task"] for r in rows})
  fig, axes = plt.subplots(
    1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 3.6), dpi=110, squeeze=False
  )
  for ax, task in zip(axes[0], tasks):
    for method in res["methods"]:
      pts = sorted((r["tokens"], r["accuracy"]) for r in rows if r["method"] == method and
                   r["task"] == task)  # fmt: skip
      if pts:
        ax.plot(*zip(*pts), marker="o", lw=1.2, label=method)
    ax.axvline(res["train_len"], color="grey", ls=":", lw=1)
    ax.set(xlabel="length (tokens)", ylabel="accuracy", title=task, ylim=(-0.03, 1.03))
  ax = axes[0][-1]
  for method in res["methods"]:
    pts = sorted((m["length"], m["kv_bytes"] / 2**20) for m in res["memory"] if
                 m["method"] == method)  # fmt: skip
    ax.plot(*zip(*pts), marker="o", lw=1.2, label=method)
  ax.set(yscale="log", xlabel="length (tokens)", ylabel="KV state (MiB)")
  ax.set_title("decode-state memory, batch 1")
  ax.legend(fontsize=7)
  for ax in axes[0]:  # lengths double: log2 axis, one labelled tick per length
    ax.set_xscale("log", base=2)
    ax.set_xticks(res["lengths"], [str(n) for n in res["lengths"]])
    ax.minorticks_off()
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def run_memory(run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
  """The ``memory`` suite: writes ``memory.json``, ``memory.png`` and the report section."""
  run_dir = Path(run_dir)
  res = memory_grid(run_dir, **kwargs)
  (run_dir / "memory.json").write_text(json.dumps(res, indent=2))
  png = memory_plot(
    res, run_dir / "memory.png", f"training-free memories, trained length L={res['train_len']}"
  )
  opts = [f"- `{m}`: {json.dumps(o)}" for m, o in res["options"].items()]
  body = [
    f"Passkey / needle accuracy (exact match of the answer, mean over depths "
    f"{sorted({c['depth'] for c in res['cells']})}) and decode-state (KV) memory for one "
    f"sequence, per method, at 1x-{res['lengths'][-1] // res['train_len']}x the trained "
    f"length L={res['train_len']} tokens; step {res['step']}, the same weights under every "
    f"method. Tokenizer: `{Path(res['tokenizer']).name}` ({res['vocab_size']} ids); lengths "
    "are in tokens, `chars` the characters they hold.",
    "",
    report.markdown_table(memory_rows(res)),
    "",
    f"![accuracy and KV memory by length]({png.name})",
    "",
    "Method options:",
    "",
    *opts,
  ]
  path = run_dir / "report.md"
  if not path.exists():
    path.write_text(f"# memzoo run report: `{run_dir.name}`\n\n")
  report.write_section(path, "Training-free memories", "\n".join(body))
  return res


def run(
  run_dir: str | Path,
  suite: str = "all",
  *,
  n: int = 32,
  batches: int | None = None,
  **memory_kwargs: Any,
):
  """Runs a suite, writes ``eval.json`` and the report section; returns the results.

  ``memory_kwargs`` (``methods``, ``factors``, ``depths``, ``tasks``, ``task_params``) go to
  ``memory_grid``.
  """
  if suite not in SUITES:
    raise InputError(f"unknown suite {suite!r}; choose from {SUITES}")
  run_dir = Path(run_dir)
  if suite == "memory":
    return {"memory": run_memory(run_dir, n=n, **memory_kwargs)}
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
    body += [
      report.markdown_table(
        out["synthetic"], ["task", "length", "chars", "accuracy", "n", "chance"]
      )
    ]
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
      report.markdown_table(
        out["synthetic"], ["task", "length", "chars", "accuracy", "n", "chance"]
      )
    )
  if "memory" in out:
    lines.append(report.markdown_table(memory_rows(out["memory"])))
  return "\n".join(lines)
