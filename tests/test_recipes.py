"""Every recipe in ``configs/`` trains: a few steps at a reduced size (fast), and 300 steps at
its own size with a finite, falling loss (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines import config as config_lib
from pipelines import recipe_table
from pipelines.train.loop import train

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def _run(path: Path, tmp_path: Path, extra: list[str]):
  quiet = [
    f"run_dir={tmp_path / path.stem}",
    "train.progress=false",
    "train.async_checkpoint=false",
    "train.checkpoint_every=100000",
    "train.eval_batches=1",
    "train.on_nonfinite=stop",
    # The test session fakes 8 CPU devices; a recipe runs on one, as on a laptop.
    "mesh.data=1",
  ]
  exp = config_lib.load(path, quiet + extra)
  return train(exp)


def _reduced(path: Path) -> list[str]:
  """Overrides that shrink a recipe's model and data (1 layer, width 32, 32-token rows)."""
  exp = config_lib.load(path)
  model = exp.model
  if hasattr(model, "backbone"):
    sizes = ["model.backbone.n_layers=1", "model.backbone.max_len=64"]
  elif getattr(model, "attention_layers", ()):
    sizes = []  # hybrids (BASED, JRT) keep their two layers: layer 1 is the attention layer
  else:
    sizes = ["model.n_layers=1"]
    if model.family == "transformer":
      sizes += ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64"]
  return sizes + [
    "data.seq_len=32",
    "data.batch_size=2",
    "data.max_documents=20",
    "train.steps=3",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=3",
    "train.compute_dtype=float32",
    "train.grad_accum=1",
  ]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_trains_a_few_steps_at_a_reduced_size(path, tmp_path):
  result = _run(path, tmp_path, _reduced(path))
  losses = [r["loss"] for r in result.history if "loss" in r]
  assert len(losses) == 3 and np.all(np.isfinite(losses))


@pytest.mark.slow
@pytest.mark.parametrize(
  "name",
  [
    pytest.param(p.stem, marks=pytest.mark.skip(reason="accelerator recipe"))
    if p.stem in recipe_table.ACCELERATOR_ONLY
    else p.stem
    for p in CONFIGS
  ],
)
def test_recipe_trains_300_steps_with_a_falling_loss(name, tmp_path):
  # The run behind the README's recipe table (python -m pipelines.recipe_table --steps 300).
  result = recipe_table.train_recipe(name, tmp_path / name, 300)
  losses = np.asarray([r["loss"] for r in result.history if "loss" in r])
  assert len(losses) == 300 and np.all(np.isfinite(losses))
  # Falling: the last 20 steps sit well below the first 10 (which start near ln 260 = 5.6).
  row = recipe_table.row(name, result)
  assert row["final loss"] < row["first loss"] - 1.0
  assert np.isfinite(row["held-out loss"]) and row["held-out loss"] < losses[0] - 1.0
