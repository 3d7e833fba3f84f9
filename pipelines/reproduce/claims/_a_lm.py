"""Shared parts of the streaming, RoPE-scaling, landmark and Duo claims: a small transformer
language model trained on the embedded corpus through ``memzoo train``'s loop, and models
trained on a synthetic task through ``train_on_task``.

Trained language models are kept for the life of the process (keyed by their settings), so
``memzoo reproduce --all`` trains the shared transformer once for the claims that use it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zoo
from pipelines import config as config_lib
from pipelines.evaluation import extrapolate
from pipelines.run import load_run
from pipelines.tasks.training import Budget, train_on_task
from pipelines.train.loop import train

_TRAINED: dict[tuple, tuple[Any, nnx.Module, np.ndarray, list[dict[str, Any]]]] = {}


def train_lm(
  *,
  seed: int,
  seq_len: int,
  steps: int,
  d_model: int,
  n_layers: int,
  batch_size: int,
  max_documents: int,
  lr: float = 3e-3,
  progress: bool = False,
  run_dir: Path | None = None,
  **model: Any,
) -> tuple[Any, nnx.Module, np.ndarray, list[dict[str, Any]]]:
  """(experiment, trained transformer, held-out token stream, train history).

  A Llama-style transformer (``n_heads = d_model // 32``, half as many KV heads) trained with
  ``pipelines.train.loop.train`` on the standard-library corpus at ``seq_len`` tokens; the run
  directory is temporary unless ``run_dir`` is given.
  """
  heads = max(d_model // 32, 2)
  spec = {
    "d_model": d_model,
    "n_layers": n_layers,
    "n_heads": heads,
    "n_kv_heads": max(heads // 2, 1),
    "d_ff": 3 * d_model,
    "max_len": max(512, seq_len),
    **model,
  }
  key = (seed, seq_len, steps, batch_size, max_documents, lr, tuple(sorted(spec.items())))
  if key in _TRAINED:
    return _TRAINED[key]
  with tempfile.TemporaryDirectory(prefix="memzoo-reproduce-") as tmp:
    path = Path(run_dir) if run_dir is not None else Path(tmp) / "run"
    exp = config_lib.from_dict(
      {
        "run_dir": str(path),
        "seed": seed,
        "model": spec,
        "data": {
          "source": "stdlib",
          "max_documents": max_documents,
          "seq_len": seq_len,
          "batch_size": batch_size,
        },
        "mesh": {"data": 1},
        "train": {
          "steps": steps,
          "lr": lr,
          "warmup_steps": min(20, steps // 5),
          "log_every": max(steps // 10, 1),
          "eval_every": 0,
          "checkpoint_every": steps,
          "async_checkpoint": False,
          "progress": progress,
        },
        "eval": {"batches": 2, "sample_tokens": 0},
      }
    )
    result = train(exp)
    exp, model, _ = load_run(path)
    stream = extrapolate.heldout_stream(exp)
  out = (exp, model, stream, result.history)
  _TRAINED[key] = out
  return out


_TASK_MODELS: dict[tuple, tuple[nnx.Module, dict[str, Any]]] = {}


def train_task_model(
  cfg: Any, source: Any, eval_source: Any, budget: Budget, seed: int, key: tuple, **kw: Any
) -> tuple[nnx.Module, dict[str, Any]]:
  """(trained model of ``cfg``, ``train_on_task``'s result) on a synthetic task; ``key``
  describes the two sources, so claims that train the same model share it in one process."""
  full_key = (repr(cfg), budget, seed, key)
  if full_key not in _TASK_MODELS:
    res = train_on_task(cfg, source, eval_source, budget, seed=seed, **kw)
    model = zoo.build(cfg, rngs=nnx.Rngs(seed))
    nnx.update(model, res["params"])
    _TASK_MODELS[full_key] = (model, res)
  return _TASK_MODELS[full_key]


def finetune_lm(
  exp: Any,
  model: nnx.Module,
  cfg: Any,
  *,
  seq_len: int,
  steps: int,
  batch_size: int,
  lr: float,
  seed: int,
) -> tuple[nnx.Module, list[float]]:
  """``model``'s parameters in a model of config ``cfg`` (e.g. a RoPE variant), trained
  ``steps`` more steps on the run's corpus at ``seq_len`` tokens with ``memzoo train``'s step
  and optimizer; returns (the finetuned model, the loss of every step)."""
  from pipelines.data import loader
  from pipelines.train.loop import make_train_step
  from pipelines.train.optim import optimizer

  tuned = extrapolate.with_config(model, cfg)
  data_cfg = dataclasses.replace(exp.data, seq_len=seq_len, batch_size=batch_size)
  train_cfg = dataclasses.replace(
    exp.train, steps=steps, lr=lr, warmup_steps=min(5, steps // 4), progress=False
  )
  data = loader.build(data_cfg, vocab_size=cfg.vocab_size)
  it = iter(loader.train_dataset(data.train, batch_size, seed))
  graphdef, params, rest = nnx.split(tuned, nnx.Param, ...)
  # The train step donates its parameters: train a copy, never the trained model's buffers.
  params = jax.tree.map(jnp.copy, params)
  tx = optimizer(train_cfg)
  opt_state = tx.init(params)
  step = make_train_step(graphdef, rest, tx, train_cfg)
  losses = []
  for _ in range(steps):
    params, opt_state, m = step(params, opt_state, next(it))
    losses.append(float(m["loss"]))
  return nnx.merge(graphdef, params, rest), losses


PASSKEY_DIGITS = 5


def passkey_sources(length: int, seed: int) -> tuple[Any, Any]:
  """(training, held-out) passkey sources of ``length`` tokens, needle depth drawn per
  example (byte tokens, the Landmark paper's "The grass is green ..." filler)."""
  from pipelines.tasks.passkey import Passkey

  train_src = Passkey(length=length, num_digits=PASSKEY_DIGITS, seed=seed)
  eval_src = Passkey(length=length, num_digits=PASSKEY_DIGITS, seed=seed + 10_000)
  return train_src, eval_src


def passkey_backbone(settings: Any, max_len: int) -> Any:
  """The transformer layout the passkey claims train (landmark's backbone, Duo's model)."""
  d_model = settings.pick(tiny=32, small=64, large=256)
  return zoo.config(
    "transformer",
    "tiny",
    d_model=d_model,
    n_layers=settings.pick(tiny=1, small=2, large=4),
    n_heads=4,
    n_kv_heads=2,
    d_ff=3 * d_model,
    max_len=max_len,
  )


def passkey_budget(settings: Any) -> Budget:
  return Budget(
    steps=settings.pick(tiny=2, small=300, large=2000),
    batch_size=settings.pick(tiny=2, small=16, large=32),
    lr=3e-3,
    warmup=settings.pick(tiny=1, small=20, large=100),
    eval_examples=settings.pick(tiny=2, small=32, large=128),
  )


def passkey_transformer(settings: Any, length: int, max_len: int, progress: bool = False):
  """(plain transformer trained on passkey at ``length``, its ``train_on_task`` result)."""
  train_src, eval_src = passkey_sources(length, settings.seed)
  return train_task_model(
    passkey_backbone(settings, max_len),
    train_src,
    eval_src,
    passkey_budget(settings),
    settings.seed,
    key=("passkey", length, PASSKEY_DIGITS),
    progress=progress,
  )


def passkey_accuracy(model: nnx.Module, length: int, n: int, seed: int, batch_size: int) -> float:
  """Exact-match passkey accuracy of ``model`` on ``n`` held-out examples of ``length`` tokens."""
  from pipelines.tasks import evaluate as evaluate_task

  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  _, src = passkey_sources(length, seed)
  res = evaluate_task(
    lambda x: forward(state, jnp.asarray(x)), src, n, batch_size=min(n, batch_size)
  )
  return float(res["accuracy"])
