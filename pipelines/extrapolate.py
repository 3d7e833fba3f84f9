"""``memzoo extrapolate RUN``: how a trained model behaves beyond its training length.

For each *variant* of the trained model (RoPE scalings and attention policies, applied to the
same parameters without retraining) and each total length from the training length ``L`` to
many times it, this measures the loss at every position (held-out text, streamed through the
model's decode state in chunks, so memory stays bounded) and passkey accuracy on a depth x
length grid. It writes ``extrapolation.json``, PNG plots and a report section.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

import zoo
from pipelines import plots, report
from pipelines.data import loader
from pipelines.errors import InputError
from pipelines.rundir import atomic_write_text
from pipelines.streaming import ChunkedRunner
from pipelines.tasks import evaluate as evaluate_task
from pipelines.tasks import grid
from pipelines.tokenizers import load_tokenizer
from pipelines.train import load_run

ROPE_VARIANTS = ("linear", "ntk", "dynamic_ntk", "yarn", "abf", "truncated")
POLICY_VARIANTS = ("window", "sinks_window")
SINKS = 4


def variant_config(cfg: Any, name: str, train_len: int, max_len: int) -> Any:
  """The model config of variant ``name`` for lengths up to ``max_len``.

  ``none`` is the model as trained. RoPE variants use ``factor = max_len / train_len``; ``abf``
  raises the base 50x (10k -> 500k, the adjusted-base-frequency recipe). ``window`` keeps the
  last ``train_len`` keys; ``sinks_window`` also keeps the first four (StreamingLLM).
  """
  factor = max(max_len / train_len, 1.0)
  fields = {f.name for f in dataclasses.fields(cfg)}
  changes: dict[str, Any] = {"max_len": max(getattr(cfg, "max_len", max_len), max_len)}
  if name == "none":
    pass
  elif name in ROPE_VARIANTS:
    if "rope_scaling" not in fields:
      raise InputError(f"model {cfg.family!r} has no RoPE to scale (variant {name!r})")
    from zoo.layers.rope import RopeScaling

    kw: dict[str, Any] = {"kind": name, "factor": factor, "original_max_len": train_len}
    if name == "abf":
      kw = {"kind": "abf", "base": cfg.rope_base * 50}
    changes["rope_scaling"] = RopeScaling(**kw)
  elif name in POLICY_VARIANTS:
    if "window" not in fields:
      raise InputError(f"model {cfg.family!r} has no attention window (variant {name!r})")
    sinks = SINKS if name == "sinks_window" else 0
    changes.update(window=train_len - sinks, sinks=sinks)
  else:
    raise InputError(
      f"unknown variant {name!r}; choose from none, {', '.join(ROPE_VARIANTS + POLICY_VARIANTS)}"
    )
  return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k in fields})


def with_config(model: nnx.Module, cfg: Any) -> nnx.Module:
  """A model of config ``cfg`` carrying ``model``'s parameters (variants share weights)."""
  fresh = zoo.build(cfg, rngs=0)
  nnx.update(fresh, nnx.state(model, nnx.Param))
  return fresh


def heldout_stream(exp: Any, tokenizer: Any = None) -> np.ndarray:
  """The held-out token stream of a run's corpus (documents concatenated), tokenized with
  ``tokenizer`` (default: the run's, ``load_tokenizer(exp)``)."""
  tok = load_tokenizer(exp) if tokenizer is None else tokenizer
  data = loader.build(exp.data, vocab_size=exp.model.vocab_size, tokenizer=tok)
  return data.heldout.tokens.astype(np.int32)


def heldout_windows(stream: np.ndarray, length: int, count: int) -> np.ndarray:
  """``count`` evenly spaced windows of ``length + 1`` tokens of ``stream`` (documents
  concatenated, as in long-context perplexity benchmarks); a short stream is repeated."""
  need = count * (length + 1)
  if len(stream) < need:
    stream = np.tile(stream, math.ceil(need / len(stream)))
  stride = (len(stream) - (length + 1)) // max(count - 1, 1) if count > 1 else 0
  return np.stack([stream[i * stride : i * stride + length + 1] for i in range(count)])


def position_losses(model: nnx.Module, windows: np.ndarray, chunk: int) -> np.ndarray:
  """Mean next-token loss at every position ``[n]`` over the windows, streamed in chunks."""
  runner = ChunkedRunner(model, chunk)
  _, nll = runner.run(windows[:, :-1], windows[:, 1:], keep_logits=False)
  return nll.mean(axis=0)


def passkey_grid(
  model: nnx.Module,
  depths: list[float],
  lengths: list[int],
  n: int,
  chunk: int,
  tokenizer: Any = None,
) -> list[dict[str, Any]]:
  """Passkey accuracy per (depth, length) cell, texts built with ``tokenizer`` (default bytes;
  lengths in tokens); lengths too short for the task are skipped."""
  out = []
  runner = ChunkedRunner(model, chunk)
  predict = lambda x: runner.run(x)[0]
  for length in lengths:
    try:
      cells = grid("passkey", depths=depths, lengths=[length], seed=0, tokenizer=tokenizer)
    except ValueError:  # the needle and question do not fit in this length
      continue
    for cell in cells:
      res = evaluate_task(predict, cell.source, n, batch_size=min(n, 8))
      out.append({"depth": cell.depth, "length": cell.length, **res})
  return out


def run(
  run_dir: str | Path,
  *,
  factors: tuple[float, ...] = (1, 2, 4, 8, 16),
  variants: tuple[str, ...] = ("none", "ntk", "yarn", "sinks_window"),
  windows: int = 4,
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
  passkey_factors: tuple[float, ...] = (2, 4, 8),
  passkey_examples: int = 8,
) -> dict[str, Any]:
  """Runs the extrapolation suite on a run directory; returns what it writes to JSON."""
  run_dir = Path(run_dir)
  exp, model, step = load_run(run_dir)
  tok = load_tokenizer(run_dir)
  train_len = exp.data.seq_len
  lengths = sorted({int(train_len * f) for f in factors})
  max_len = lengths[-1]
  chunk = train_len
  stream = heldout_stream(exp, tok)
  results: dict[str, Any] = {
    "model": exp.model.family,
    "step": step,
    "train_len": train_len,
    "tokenizer": getattr(tok, "name", "byte"),
    "lengths": lengths,
    "variants": {},
  }
  for name in variants:
    cfg = variant_config(exp.model, name, train_len, max_len)
    vm = with_config(model, cfg)
    per_length = {}
    for n in lengths:
      losses = position_losses(vm, heldout_windows(stream, n, windows), chunk)
      per_length[str(n)] = {
        "mean_loss": float(losses.mean()),
        "loss_within_train_len": float(losses[:train_len].mean()),
        "loss_beyond_train_len": float(losses[train_len:].mean()) if n > train_len else None,
        "position_loss": losses.tolist(),
      }
    pk_lengths = sorted({int(train_len * f) for f in passkey_factors})
    results["variants"][name] = {
      "config": {
        "rope_scaling": str(getattr(cfg, "rope_scaling", None)),
        "window": getattr(cfg, "window", None),
        "sinks": getattr(cfg, "sinks", None),
      },
      "perplexity": per_length,
      "passkey": passkey_grid(vm, list(depths), pk_lengths, passkey_examples, chunk, tok),
    }
  atomic_write_text(run_dir / "extrapolation.json", json.dumps(results))
  write_report(run_dir, results)
  return results


def write_report(run_dir: Path, results: dict[str, Any]) -> None:
  title = f"{results['model']} (trained at L={results['train_len']})"
  loss_png = plots.loss_by_position(results, run_dir / "extrapolation_loss.png", title)
  heat = []
  for name, v in results["variants"].items():
    if v["passkey"]:
      heat.append(
        plots.needle_heatmap(
          v["passkey"], run_dir / f"passkey_{name}.png", f"passkey accuracy: {title}, {name}"
        )
      )
  rows = []
  for name, v in results["variants"].items():
    row: dict[str, Any] = {"variant": name}
    for n, p in v["perplexity"].items():
      row[f"loss@{n}"] = p["mean_loss"]
    rows.append(row)
  body = [
    f"Loss (nats/token) on held-out text by total length; training length "
    f"L={results['train_len']}. Variants reuse the trained weights.",
    "",
    report.markdown_table(rows),
    "",
    f"![loss by position]({loss_png.name})",
    "",
    "Passkey accuracy by depth x length:",
    "",
    *[f"![{p.stem}]({p.name})" for p in heat],
  ]
  out = run_dir / "report.md"
  if not out.exists():
    atomic_write_text(out, f"# memzoo run report: `{run_dir.name}`\n\n")
  report.write_section(out, "Length extrapolation", "\n".join(body))
