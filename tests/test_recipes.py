"""Every recipe in ``configs/`` trains: a few steps at a reduced size (fast), and 300 steps at
its own size with a finite, falling loss (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines import config as config_lib
from pipelines.train.loop import train

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
# A GPU/TPU recipe (8 layers, d=512, 64 x 1024 tokens per step): its 300-step run is not for
# CPU CI; the fast test still trains it at a reduced size.
ACCELERATOR_ONLY = {"transformer_small"}


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
  "path",
  [
    pytest.param(p, marks=pytest.mark.skip(reason="accelerator recipe"))
    if p.stem in ACCELERATOR_ONLY
    else p
    for p in CONFIGS
  ],
  ids=[p.stem for p in CONFIGS],
)
def test_recipe_trains_300_steps_with_a_falling_loss(path, tmp_path):
  result = _run(path, tmp_path, ["train.steps=300", "train.log_every=1", "train.eval_every=300"])
  losses = np.asarray([r["loss"] for r in result.history if "loss" in r])
  assert len(losses) == 300 and np.all(np.isfinite(losses))
  # Falling: the last 20 steps sit well below the first 10 (which start near ln 260 = 5.6).
  assert losses[-20:].mean() < losses[:10].mean() - 1.0
  evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
  assert evals and np.isfinite(evals[-1]) and evals[-1] < losses[0] - 1.0
