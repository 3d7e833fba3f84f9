"""MQAR recall by model and state size.

``python -m pipelines.evaluation.mqar_table [--steps N ...]``.

Trains each recurrent model at two state sizes (and the transformer, the ceiling whose KV cache
grows with the sequence) on multi-query associative recall with one fixed budget, and writes a
Markdown table of held-out accuracy. The BASED paper's ordering to look for: attention > BASED >
pure linear attention at equal state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

import zoo
from pipelines.tasks.mqar import MQAR
from pipelines.tasks.training import Budget, count_params, train_on_task


@dataclasses.dataclass(frozen=True)
class Variant:
  label: str  # the row's model name
  family: str
  overrides: dict[str, Any]


# Two state sizes per model, from the tiny presets (d_model 64). "linear attention" is BASED
# without its sliding-window layer: Taylor linear attention alone, at feature sizes that bracket
# each BASED state from below and above. The transformer appears
# twice: the Llama layout, and with Primer's q/k/v convolutions (``conv_width=3``), the same
# local mixing every recurrent model here has in front of its memory.
TRANSFORMER = {"d_model": 64, "n_heads": 4, "n_kv_heads": 4, "d_ff": 128}
SLOW_DECAY = (0.0, 1.0)
MAMBA2_HD64 = {"n_layers": 2, "d_ff": 128, "head_dim": 64}
VARIANTS = (
  Variant("transformer", "transformer", TRANSFORMER),
  Variant("transformer", "transformer", {**TRANSFORMER, "conv_width": 3}),
  Variant("based", "based", {"feature_dim": 4}),
  Variant("based", "based", {"feature_dim": 8}),
  Variant("linear attention", "based", {"feature_dim": 4, "attention_layers": ()}),
  Variant("linear attention", "based", {"feature_dim": 5, "attention_layers": ()}),
  Variant("linear attention", "based", {"feature_dim": 6, "attention_layers": ()}),
  Variant("linear attention", "based", {"feature_dim": 7, "attention_layers": ()}),
  Variant("linear attention", "based", {"feature_dim": 8, "attention_layers": ()}),
  Variant("deltanet", "deltanet", {"n_heads": 4}),
  Variant("deltanet", "deltanet", {"n_heads": 2}),
  Variant("gated_deltanet", "gated_deltanet", {"n_heads": 4}),
  Variant("gated_deltanet", "gated_deltanet", {"n_heads": 2}),
  Variant("mamba2", "mamba2", {"n_layers": 2, "d_state": 8, "d_ff": 128}),
  Variant("mamba2", "mamba2", {"n_layers": 2, "d_state": 16, "d_ff": 128}),
  Variant("mom", "mom", {"n_heads": 4, "n_memories": 2, "top_k": 1}),
  Variant("mom", "mom", {"n_heads": 4, "n_memories": 4, "top_k": 2}),
  Variant("jrt", "jrt", {"feature_dim": 4}),
  Variant("jrt", "jrt", {"feature_dim": 8}),
  # The decay families again with a slow initial decay, A ~ U(0, 1) (``a_init_range``): with
  # Mamba-2's U(1, 16) most heads forget a pair within the ~50 tokens before its query, and at
  # this budget they do not learn to stop (see the README). Mamba-2 here also with its paper's
  # head width 64 (same state).
  Variant("gated_deltanet", "gated_deltanet", {"n_heads": 4, "a_init_range": SLOW_DECAY}),
  Variant("gated_deltanet", "gated_deltanet", {"n_heads": 2, "a_init_range": SLOW_DECAY}),
  Variant("mamba2", "mamba2", {**MAMBA2_HD64, "d_state": 8, "a_init_range": SLOW_DECAY}),
  Variant("mamba2", "mamba2", {**MAMBA2_HD64, "d_state": 16, "a_init_range": SLOW_DECAY}),
  Variant("mom", "mom", {"n_heads": 4, "n_memories": 4, "top_k": 2, "a_init_range": SLOW_DECAY}),
)

DEFAULT_BUDGET = Budget(steps=500, batch_size=32, lr=3e-3, eval_examples=256)
# Keys from 64 ids and 8 pairs: enough that a small recurrent state has to compress (at 16 key
# ids and 4 pairs every linear model here saturates and the state-size ordering vanishes).
DEFAULT_TASK = {"length": 64, "num_pairs": 8, "token_range": (0, 128)}


def state_size(cfg: Any) -> int | None:
  """Recall-state floats per sequence (None: grows with the sequence, i.e. a KV cache)."""
  model = nnx.eval_shape(lambda: zoo.build(cfg, rngs=nnx.Rngs(0)))
  return model.state_size()


def mqar_table(
  *,
  budget: Budget = DEFAULT_BUDGET,
  length: int = DEFAULT_TASK["length"],
  num_pairs: int = DEFAULT_TASK["num_pairs"],
  token_range: tuple[int, int] = DEFAULT_TASK["token_range"],
  power_a: float | None = None,
  families: tuple[str, ...] | None = None,
  seeds: tuple[int, ...] = (0,),
  variants: tuple[Variant, ...] = VARIANTS,
  progress: bool = False,
) -> list[dict[str, Any]]:
  """Trains every variant (optionally only the rows labelled one of ``families``) once per seed
  (initialisation, data order and the task's examples all follow it) and scores it.

  Returns one dict per variant and seed: label, family, overrides, seed, state, params,
  accuracy, chance, seconds.
  """
  kw = {"length": length, "num_pairs": num_pairs, "token_range": token_range, "power_a": power_a}
  rows = []
  for v, seed in ((v, seed) for seed in seeds for v in variants):
    if families and v.label not in families:
      continue
    # The held-out seed is offset far past any training seed: never the same examples.
    train = MQAR(seed=seed, **kw)
    held_out = MQAR(seed=seed + 10_000, num_examples=max(budget.eval_examples, 1), **kw)
    overrides = dict(v.overrides)
    if v.family != "transformer":
      # One chunk per sequence when the sequence is short: no padded work.
      overrides.setdefault("chunk_size", min(64, 1 << (length - 1).bit_length()))
    cfg = zoo.config(v.family, "tiny", **overrides)
    start = time.perf_counter()
    result = train_on_task(cfg, train, held_out, budget, seed=seed, progress=progress)
    rows.append(
      {
        "label": v.label,
        "family": v.family,
        "overrides": v.overrides,
        "seed": seed,
        "state": state_size(cfg),
        "params": count_params(cfg),
        "accuracy": result["accuracy"],
        "chance": result["chance"],
        "seconds": time.perf_counter() - start,
      }
    )
    if progress:
      r = rows[-1]
      msg = f"{v.label} {v.overrides} seed {seed}: acc {r['accuracy']:.3f} ({r['seconds']:.0f} s)"
      print(msg, flush=True)
  return rows


def to_markdown(rows: list[dict[str, Any]], *, caption: str = "") -> str:
  """A Markdown table, one line per variant (seeds averaged: mean, then min-max and the count),
  sorted by model then state size."""
  groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
  for r in rows:
    variant = (r["label"], json.dumps(r["overrides"], sort_keys=True), r["state"] or 0)
    groups.setdefault(variant, []).append(r)
  lines = [caption, ""] if caption else []
  lines += [
    "| model | variant | state (floats / sequence) | params | MQAR accuracy | train s |",
    "|---|---|---:|---:|---:|---:|",
  ]
  order = lambda k: (k[0] != "transformer", k[0], k[2], len(k[1]), k[1])
  for k in sorted(groups, key=order):
    group = groups[k]
    first = group[0]
    # JSON turns tuples into lists; print them as the config field (a tuple) reads.
    fmt = lambda v: tuple(v) if isinstance(v, list) else v
    name = ", ".join(f"{k}={fmt(v)}" for k, v in first["overrides"].items()) or "tiny"
    state = "KV cache (grows with T)" if first["state"] is None else f"{first['state']:,}"
    accs = [r["accuracy"] for r in group]
    acc = f"{np.mean(accs):.3f}"
    if len(accs) > 1:
      acc += f" ({min(accs):.2f}-{max(accs):.2f}, {len(accs)} seeds)"
    seconds = np.mean([r["seconds"] for r in group])
    lines.append(
      f"| {first['label']} | {name} | {state} | {first['params']:,} | {acc} | {seconds:.0f} |"
    )
  if rows:
    lines += ["", f"Chance: {rows[0]['chance']:.3f}."]
  return "\n".join(lines) + "\n"


def save_rows(rows: list[dict[str, Any]], path: Path) -> None:
  """Writes rows as JSON, so subsets trained in separate processes can be merged later."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rows, indent=1))


def load_rows(paths: list[Path]) -> list[dict[str, Any]]:
  """Concatenates the rows of several ``save_rows`` files."""
  return [row for p in paths for row in json.loads(Path(p).read_text())]


def main(argv: list[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  d, t = DEFAULT_BUDGET, DEFAULT_TASK
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--batch-size", type=int, default=d.batch_size)
  p.add_argument("--lr", type=float, default=d.lr)
  p.add_argument("--eval-examples", type=int, default=d.eval_examples)
  p.add_argument("--length", type=int, default=t["length"])
  p.add_argument("--pairs", type=int, default=t["num_pairs"])
  p.add_argument(
    "--token-range", type=int, default=t["token_range"][1], help="keys and values use ids [0, N)"
  )
  p.add_argument(
    "--power-a", type=float, default=None, help="Zoology's power-law query placement (a)"
  )
  p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
  p.add_argument("--families", nargs="*", default=None, help="only rows with these labels")
  p.add_argument("--out", type=Path, default=None, help="write the table here too")
  p.add_argument("--rows", type=Path, default=None, help="write the rows as JSON here too")
  p.add_argument(
    "--merge",
    type=Path,
    nargs="+",
    default=None,
    help="train nothing: render one table from --rows files of earlier (e.g. parallel) runs",
  )
  a = p.parse_args(argv)
  caption = (
    f"MQAR, length {a.length}, {a.pairs} pairs, ids [0, {a.token_range}); "
    f"{a.steps} steps x batch {a.batch_size}, lr {a.lr}; {a.eval_examples} held-out examples."
  )
  if a.power_a is not None:
    caption += f" Query slots ~ i^({a.power_a} - 1) (Zoology's placement)."
  if a.merge:
    rows = load_rows(a.merge)
  else:
    budget = Budget(steps=a.steps, batch_size=a.batch_size, lr=a.lr, eval_examples=a.eval_examples)
    rows = mqar_table(
      budget=budget,
      length=a.length,
      num_pairs=a.pairs,
      token_range=(0, a.token_range),
      power_a=a.power_a,
      seeds=tuple(a.seeds),
      families=tuple(a.families) if a.families else None,
      progress=True,
    )
  if a.rows is not None:
    save_rows(rows, a.rows)
  table = to_markdown(rows, caption=caption)
  print(table)
  if a.out is not None:
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(table)
  return table


if __name__ == "__main__":
  main()
