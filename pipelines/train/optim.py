"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping."""

from __future__ import annotations

import jax
import optax

from pipelines.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=warmup,
    decay_steps=max(cfg.steps, warmup + 1),
    end_value=cfg.lr * cfg.min_lr_ratio,
  )


def _decay_mask(params):
  # Matrices decay; vectors (norm scales, biases) and scalars do not.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(
      schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask
    ),
  )
