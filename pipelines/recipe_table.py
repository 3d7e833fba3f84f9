"""The recipe table: every recipe trained for a fixed number of steps on the embedded corpus.

``python -m pipelines.recipe_table --steps 300 --out runs/recipe_table`` trains each recipe
(or ``--recipes a,b``) at its own size, one device, and writes one JSON row per recipe as it
finishes (``rows.json``, so an interrupted sweep keeps what it measured) and the markdown table
(``recipes.md``): first and final train loss, final held-out loss, median tokens/s, and whether
any loss was non-finite. The slow test in ``tests/test_recipes.py`` runs the same training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import config as config_lib
from pipelines import recipes
from pipelines.errors import NonFiniteLossError
from pipelines.report import markdown_table
from pipelines.rundir import atomic_write_text
from pipelines.train.loop import TrainResult, train

# A GPU/TPU recipe (8 layers, d=512, 64 x 1024 tokens per step): not for a CPU sweep.
ACCELERATOR_ONLY = frozenset({"transformer_small"})


def overrides(run_dir: Path, steps: int) -> list[str]:
  """What a sweep changes in a recipe: where it writes, how long, one device, quiet."""
  return [
    f"run_dir={run_dir}",
    f"train.steps={steps}",
    "train.log_every=1",
    f"train.eval_every={steps}",
    "train.progress=false",
    "train.async_checkpoint=false",
    "train.checkpoint_every=100000",
    "train.eval_batches=4",
    "train.on_nonfinite=stop",
    "mesh.data=1",
  ]


def train_recipe(name: str, run_dir: Path, steps: int, extra: list[str] = ()) -> TrainResult:
  exp = config_lib.load(recipes.path(name), overrides(run_dir, steps) + list(extra))
  return train(exp)


def row(name: str, result: TrainResult) -> dict[str, Any]:
  losses = np.asarray([r["loss"] for r in result.history if "loss" in r], np.float64)
  evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
  speed = [r["tokens_per_s"] for r in result.history if "tokens_per_s" in r][1:]  # no compile
  return {
    "recipe": name,
    "steps": int(result.step),
    "first loss": float(losses[:10].mean()),
    "final loss": float(losses[-20:].mean()),
    "held-out loss": float(evals[-1]) if evals else float("nan"),
    "tokens/s": float(np.median(speed)) if speed else float("nan"),
    "non-finite": bool(not np.all(np.isfinite(losses))),
  }


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--recipes", default=None, help="comma-separated names (default: all CPU ones)")
  p.add_argument("--out", default="runs/recipe_table")
  args = p.parse_args(argv)
  names = args.recipes.split(",") if args.recipes else recipes.names()
  names = [n for n in names if n not in ACCELERATOR_ONLY]
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows_path = out / "rows.json"
  rows = json.loads(rows_path.read_text()) if rows_path.exists() else {}
  for name in names:
    if name in rows:
      continue
    try:
      rows[name] = row(name, train_recipe(name, out / name, args.steps))
    except NonFiniteLossError as e:  # reported in the table, not hidden
      rows[name] = {"recipe": name, "steps": args.steps, "non-finite": True, "error": str(e)}
    atomic_write_text(rows_path, json.dumps(rows, indent=1))
    print(json.dumps(rows[name]), flush=True)
  table = markdown_table([rows[n] for n in sorted(rows)])
  atomic_write_text(out / "recipes.md", table + "\n")
  print(table)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
