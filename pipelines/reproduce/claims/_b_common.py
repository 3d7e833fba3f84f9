"""Shared parts of the zoology, jrt, titans and infllm claims: training a zoo model on a task
(``train_on_task``) and scoring its parameters on several held-out sources, a source that
interleaves several tasks, and a run directory around task-trained parameters (so the memory
grid of ``memzoo eval --suite memory`` reads them as it reads any run)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

import zoo
from pipelines.tasks import evaluate as evaluate_task
from pipelines.tasks.base import Example, TaskSource
from pipelines.tasks.training import Budget, train_on_task


class Interleave(TaskSource):
  """Example ``i`` is example ``i // k`` of source ``i % k`` (``k`` sources of one length):
  one training stream that mixes formats (orders, repeated contexts) in equal parts."""

  name = "interleave"

  def __init__(self, sources: Sequence[TaskSource]):
    lengths = {s.length for s in sources}
    if len(lengths) != 1:
      raise ValueError(f"interleaved sources need one length, got {sorted(lengths)}")
    self.sources = list(sources)
    super().__init__(length=lengths.pop(), num_examples=min(len(s) for s in sources))

  def __getitem__(self, index: int) -> Example:
    k = len(self.sources)
    return self.sources[index % k][index // k]

  @property
  def chance(self) -> float:
    return self.sources[0].chance


def predictor(cfg: Any, params: Any, **call_kwargs: Any):
  """``inputs [B,T] -> logits [B,T,V]`` of ``zoo.build(cfg)`` with ``params`` (jitted)."""
  model = zoo.build(cfg, rngs=nnx.Rngs(0))
  nnx.update(model, params)
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda x: nnx.merge(graphdef, state)(x, **call_kwargs)[0])
  return lambda x: fn(np.asarray(x, np.int32))


def train_and_score(
  cfg: Any,
  train: TaskSource,
  held_out: Mapping[str, TaskSource],
  budget: Budget,
  *,
  seed: int,
  progress: bool = False,
) -> dict[str, Any]:
  """Trains ``cfg`` on ``train`` (answers only) and scores the same parameters on each held-out
  source (``budget.eval_examples`` examples each, exact match of the answer spans).

  Returns ``{"accuracy": {name: float}, "first_loss", "last_loss", "params"}``.
  """
  names = list(held_out)
  out = train_on_task(cfg, train, held_out[names[0]], budget, seed=seed, progress=progress)
  acc = {names[0]: float(out["accuracy"])}
  predict = predictor(cfg, out["params"])
  for name in names[1:]:
    src = held_out[name]
    n = min(budget.eval_examples, len(src))
    acc[name] = float(evaluate_task(predict, src, n, batch_size=min(n, 32))["accuracy"])
  return {
    "accuracy": acc,
    "first_loss": out["first_loss"],
    "last_loss": out["last_loss"],
    "params": out["params"],
  }


def write_run(cfg: Any, params: Any, run_dir: Path, seq_len: int) -> Path:
  """A run directory (``config.yaml`` + a step-0 checkpoint of ``params``, byte tokenizer,
  trained length ``seq_len``) that ``pipelines.run.load_run`` and the eval suites read."""
  from pipelines import config as config_lib
  from pipelines.train.checkpoint import Checkpointer

  run_dir = Path(run_dir)
  model = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "family"}
  raw = {
    "model": {"name": cfg.family, **model},
    "data": {"seq_len": int(seq_len)},
    "run_dir": str(run_dir),
  }
  exp = config_lib.from_dict(raw, source="reproduce")
  run_dir.mkdir(parents=True, exist_ok=True)
  config_lib.dump(exp, run_dir / "config.yaml")
  ckpt = Checkpointer(run_dir, async_save=False)
  try:
    meta = {"step": 0, "model": cfg.family, "optimizer": False}
    ckpt.save(0, {"params": params}, None, meta)
  finally:
    ckpt.close()
  return run_dir
