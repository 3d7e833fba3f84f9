"""Jitted views of a model for tests (eager NNX calls dispatch op by op and are slow)."""

from __future__ import annotations

import jax
from flax import nnx


def forward_fn(model):
  """``f(tokens, segment_ids=None) -> logits``, jitted over the model's state."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state, tokens, segment_ids):
    return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids)[0]

  return lambda tokens, segment_ids=None: f(state, tokens, segment_ids)


def step_fn(model):
  """``g(tokens, decode_state) -> (logits, decode_state)``, jitted over the model's state."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def g(state, tokens, dstate):
    return nnx.merge(graphdef, state).step(tokens, dstate)

  return lambda tokens, dstate: g(state, tokens, dstate)


def decode_all(model, tokens, max_len, prefill: int = 0):
  """Logits of ``tokens [B,T]`` fed through ``step``: a ``prefill`` chunk, then one at a time."""
  import jax.numpy as jnp

  step = step_fn(model)
  dstate = model.init_state(tokens.shape[0], max_len)
  outs = []
  t = 0
  if prefill:
    logits, dstate = step(tokens[:, :prefill], dstate)
    outs.append(logits)
    t = prefill
  for i in range(t, tokens.shape[1]):
    logits, dstate = step(tokens[:, i : i + 1], dstate)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), dstate
