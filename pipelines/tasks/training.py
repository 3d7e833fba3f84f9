"""Train any zoo model on a synthetic task for a fixed budget and score it.

Used by the per-model "beats chance" tests and the MQAR table. Each row holds one example (the
task pads on the right), so no segment ids are passed and any causal model fits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import zoo
from pipelines.tasks import evaluate as evaluate_task
from pipelines.tasks.base import TaskSource


@dataclasses.dataclass(frozen=True)
class Budget:
  steps: int = 300
  batch_size: int = 32
  lr: float = 3e-3
  warmup: int = 20
  weight_decay: float = 0.0
  eval_examples: int = 256


def _batch(source: TaskSource, indices: np.ndarray) -> dict[str, np.ndarray]:
  items = [source[int(i)] for i in indices]
  keys = ("inputs", "targets", "loss_mask")
  return {k: np.stack([it[k] for it in items]) for k in keys}


def train_on_task(
  model_cfg: Any,
  train_source: TaskSource,
  eval_source: TaskSource,
  budget: Budget = Budget(),
  *,
  seed: int = 0,
  progress: bool = False,
) -> dict[str, Any]:
  """Trains ``zoo.build(model_cfg)`` on ``train_source`` answers only; scores ``eval_source``.

  Returns:
    ``{"accuracy", "chance", "n", "first_loss", "last_loss", "params"}`` where accuracy is the
    exact-match rate on the answer spans of ``budget.eval_examples`` held-out examples.
  """
  model = zoo.build(model_cfg, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  sched = optax.warmup_cosine_decay_schedule(
    0.0, budget.lr, min(budget.warmup, budget.steps - 1), max(budget.steps, 2), budget.lr * 0.1
  )
  tx = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=budget.weight_decay)
  )
  opt_state = tx.init(params)

  def loss_fn(p, batch):
    logits, _ = nnx.merge(graphdef, p, rest)(batch["inputs"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    m = batch["loss_mask"]
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)

  @jax.jit
  def step(p, o, batch):
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  rng = np.random.default_rng(seed)
  losses = []
  for _ in tqdm(range(budget.steps), desc="synthetic", disable=not progress, leave=False):
    idx = rng.integers(0, len(train_source), budget.batch_size)
    params, opt_state, loss = step(params, opt_state, _batch(train_source, idx))
    losses.append(float(loss))

  @jax.jit
  def predict(p, inputs):
    return nnx.merge(graphdef, p, rest)(inputs)[0]

  result = evaluate_task(
    lambda x: predict(params, jnp.asarray(x)), eval_source, budget.eval_examples
  )
  return {
    "accuracy": result["accuracy"],
    "n": result["n"],
    "chance": eval_source.chance,
    "first_loss": float(np.mean(losses[:10])),
    "last_loss": float(np.mean(losses[-10:])),
    "params": params,
  }


def count_params(model_cfg: Any) -> int:
  abstract = nnx.eval_shape(lambda: zoo.build(model_cfg, rngs=nnx.Rngs(0)))
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))
