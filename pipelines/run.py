"""A run directory as the jobs use it: the model an experiment builds (with the model
contract's training options applied) and a run's trained model, loaded from its checkpoint."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

import zoo
from pipelines import config as config_lib
from pipelines.errors import MissingFileError
from pipelines.train.checkpoint import Checkpointer, abstract
from pipelines.train.optim import optimizer
from zoo import interface


def build_model(
  exp: config_lib.Experiment, compute_dtype: str | None = None, remat_policy: str | None = None
):
  """The model of an experiment with the train compute dtype and remat policy applied (the model
  contract, ``zoo.interface``); returns (graphdef, params, rest) where ``params`` is the
  ``nnx.Param`` state."""
  cfg = interface.with_compute_dtype(exp.model, compute_dtype)
  model = zoo.build(cfg, rngs=nnx.Rngs(exp.seed))
  interface.set_remat(model, remat_policy)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def load_run(run_dir: str | Path, step: int | None = None):
  """(experiment, model with trained parameters, step) of a run directory; for a curriculum
  (``train.stages``) the experiment as its last stage trains it."""
  run_dir = Path(run_dir)
  if not (run_dir / "config.yaml").is_file():
    raise MissingFileError(f"{run_dir} is not a run directory (no config.yaml)")
  # A curriculum's model is its last stage's (its RoPE settings and training length).
  exp = config_lib.final_experiment(config_lib.load(run_dir / "config.yaml"))
  graphdef, params, rest = build_model(exp)
  ckpt = Checkpointer(run_dir, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise MissingFileError(f"{run_dir} has no checkpoint")
    target = {"params": params}
    if ckpt.has_optimizer(step):
      target["opt"] = optimizer(exp.train).init(params)
    s, state, _, _ = ckpt.restore(abstract(target), step)
  finally:
    ckpt.close()
  model = nnx.merge(graphdef, state["params"], rest)
  return exp, model, s
