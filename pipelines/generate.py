"""Sampling from a model through its decode state (``init_state`` / ``step``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from pipelines.errors import InputError
from zoo.interface import LanguageModel


def generate(
  model: LanguageModel,
  prompt: np.ndarray,
  num_tokens: int,
  *,
  temperature: float = 0.8,
  seed: int = 0,
  progress: bool = False,
) -> np.ndarray:
  """Continues ``prompt [B, P]`` by ``num_tokens`` tokens; returns ``[B, num_tokens]`` int32.

  The prompt is prefilled in one ``step`` call, then one token per call.
  """
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise InputError(f"prompt must be [B, P] with P >= 1, got shape {prompt.shape}")
  batch, plen = prompt.shape
  max_len = plen + num_tokens
  if max_len > model.max_len and not model.unbounded_decode:
    raise InputError(
      f"prompt ({plen}) + num_tokens ({num_tokens}) exceeds the model's max_len={model.max_len}"
    )
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens, dstate, key):
    logits, dstate = nnx.merge(graphdef, state).step(tokens, dstate)
    last = logits[:, -1, :]
    if temperature > 0:
      nxt = jax.random.categorical(key, last / temperature, axis=-1)
    else:
      nxt = jnp.argmax(last, axis=-1)
    return nxt.astype(jnp.int32), dstate

  dstate = model.init_state(batch, max_len)
  key = jax.random.key(seed)
  out = []
  tok, dstate = step(state, jnp.asarray(prompt), dstate, key)
  for i in tqdm(range(num_tokens), desc="sample", disable=not progress, leave=False):
    out.append(tok)
    if i + 1 == num_tokens:
      break
    key = jax.random.fold_in(key, i)
    tok, dstate = step(state, tok[:, None], dstate, key)
  return np.stack([np.asarray(t) for t in out], axis=1)
