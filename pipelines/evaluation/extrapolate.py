"""``memzoo extrapolate RUN``: how a trained model behaves beyond its training length.

For each *variant* of the trained model (RoPE scalings and attention policies, applied to the
same parameters without retraining) and each total length from the training length ``L`` to
many times it, this measures the loss at every position (held-out text, streamed through the
model's decode state in chunks, so memory stays bounded) and passkey accuracy on a depth x
length grid. It writes ``extrapolation.json``, PNG plots and a report section.

Variants apply per family: RoPE scalings only to models with RoPE (``rope_scaling`` in the
config), cache policies (``window``, ``sinks_window``) only to attention models with a KV cache
that takes a window and sinks. Every model also gets a state-size readout: the floats its decode
state holds after each length (a KV cache grows with length, a recurrent memory does not). The
default variants are those of ``DEFAULT_VARIANTS`` that apply; an explicitly requested variant
that does not apply is refused before anything is computed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import zoo
from pipelines import config as config_lib
from pipelines import plots, report
from pipelines.data import loader
from pipelines.data.hf_tokenizer import load_tokenizer
from pipelines.errors import InputError, MissingFileError
from pipelines.evaluation.chunked import ChunkedRunner
from pipelines.run import load_run
from pipelines.rundir import atomic_write_text
from pipelines.tasks import evaluate as evaluate_task
from pipelines.tasks import grid

ROPE_VARIANTS = ("linear", "ntk", "dynamic_ntk", "yarn", "abf", "truncated")
POLICY_VARIANTS = ("window", "sinks_window")
VARIANTS = ("none", *ROPE_VARIANTS, *POLICY_VARIANTS)
DEFAULT_VARIANTS = ("none", "ntk", "yarn", "sinks_window")
SINKS = 4


def _fields(cfg: Any) -> set[str]:
  return {f.name for f in dataclasses.fields(cfg)}


def has_rope(cfg: Any) -> bool:
  """True when the model's positions come from a scalable RoPE."""
  return "rope_scaling" in _fields(cfg)


def has_cache_policy(cfg: Any) -> bool:
  """True for attention models whose KV cache takes a window and attention sinks (recurrent
  families have a ``window`` too, for their hybrid attention layers, but no sinks)."""
  return {"window", "sinks"} <= _fields(cfg)


def applicable_variants(cfg: Any) -> tuple[str, ...]:
  """The variants of :data:`VARIANTS` that apply to a model config, in that order."""
  return tuple(
    v
    for v in VARIANTS
    if v == "none"
    or (v in ROPE_VARIANTS and has_rope(cfg))
    or (v in POLICY_VARIANTS and has_cache_policy(cfg))
  )


def select_variants(cfg: Any, requested: tuple[str, ...] | None = None) -> tuple[str, ...]:
  """``requested`` checked against the model (ValueError naming the first that does not apply),
  or, when None, the default variants that apply."""
  ok = applicable_variants(cfg)
  if requested is None:
    return tuple(v for v in DEFAULT_VARIANTS if v in ok)
  if not requested:
    raise InputError("no variants requested")
  for v in requested:
    if v not in VARIANTS:
      raise InputError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if v not in ok:
      why = "has no RoPE" if v in ROPE_VARIANTS else "has no attention cache with sinks"
      raise InputError(
        f"variant {v!r} does not apply to model {cfg.family!r} ({why}); "
        f"variants that apply: {', '.join(ok)}"
      )
  return tuple(dict.fromkeys(requested))


def state_floats(model: nnx.Module, length: int) -> int:
  """Floats in the decode state of one sequence after ``length`` tokens (shapes only)."""
  shapes = jax.eval_shape(lambda: model.init_state(1, length))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)))


def variant_config(cfg: Any, name: str, train_len: int, max_len: int) -> Any:
  """The model config of variant ``name`` for lengths up to ``max_len``.

  ``none`` is the model as trained. RoPE variants use ``factor = max_len / train_len``; ``abf``
  raises the base 50x (10k -> 500k, the adjusted-base-frequency recipe). ``window`` keeps the
  last ``train_len`` keys; ``sinks_window`` also keeps the first four (StreamingLLM).
  """
  factor = max(max_len / train_len, 1.0)
  fields = _fields(cfg)
  changes: dict[str, Any] = {"max_len": max(getattr(cfg, "max_len", max_len), max_len)}
  if name == "none":
    pass
  elif name in ROPE_VARIANTS:
    if not has_rope(cfg):
      raise InputError(f"model {cfg.family!r} has no RoPE to scale (variant {name!r})")
    from zoo.layers.rope import RopeScaling

    kw: dict[str, Any] = {"kind": name, "factor": factor, "original_max_len": train_len}
    if name == "abf":
      kw = {"kind": "abf", "base": cfg.rope_base * 50}
    changes["rope_scaling"] = RopeScaling(**kw)
  elif name in POLICY_VARIANTS:
    if not has_cache_policy(cfg):
      raise InputError(f"model {cfg.family!r} has no attention cache with sinks ({name!r})")
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
  variants: tuple[str, ...] | None = None,
  windows: int = 4,
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
  passkey_factors: tuple[float, ...] = (2, 4, 8),
  passkey_examples: int = 8,
  progress: bool = False,
) -> dict[str, Any]:
  """Runs the extrapolation suite on a run directory; returns what it writes to JSON.

  ``variants=None`` runs the default variants that apply to the run's model; named variants are
  all checked against the model (and their configs built) before anything is computed.
  """
  run_dir = Path(run_dir)
  if not (run_dir / "config.yaml").is_file():
    raise MissingFileError(f"{run_dir} is not a run directory (no config.yaml)")
  if not factors or min(factors) <= 0:
    raise InputError(f"factors must be positive, got {factors}")
  # A curriculum is measured as its last stage left it (its length, its RoPE settings).
  exp = config_lib.final_experiment(config_lib.load(run_dir / "config.yaml"))
  train_len = exp.data.seq_len
  lengths = sorted({int(train_len * f) for f in factors})
  max_len = lengths[-1]
  variants = select_variants(exp.model, variants)
  configs = {name: variant_config(exp.model, name, train_len, max_len) for name in variants}
  exp, model, step = load_run(run_dir)
  tok = load_tokenizer(run_dir)
  chunk = train_len
  stream = heldout_stream(exp, tok)
  results: dict[str, Any] = {
    "model": exp.model.family,
    "step": step,
    "train_len": train_len,
    "tokenizer": getattr(tok, "name", "byte"),
    "lengths": lengths,
    "state_floats": {str(n): state_floats(model, n) for n in lengths},
    "variants": {},
  }
  bar = tqdm(total=len(variants) * len(lengths), desc="extrapolate", disable=not progress)
  for name in variants:
    cfg = configs[name]
    vm = with_config(model, cfg)
    per_length = {}
    for n in lengths:
      bar.set_postfix_str(f"{name} @ {n}")
      losses = position_losses(vm, heldout_windows(stream, n, windows), chunk)
      bar.update(1)
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
  bar.close()
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
  state = results.get("state_floats", {})
  body = [
    f"Loss (nats/token) on held-out text by total length; training length "
    f"L={results['train_len']}. Variants reuse the trained weights.",
    "",
    report.markdown_table(rows),
    "",
    "Decode state of one sequence after n tokens (floats; a KV cache grows, a recurrent memory "
    "does not): " + ", ".join(f"n={n}: {f:,}" for n, f in state.items()),
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
