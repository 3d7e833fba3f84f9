"""Long inputs through a model's decode state, in chunks, so memory stays bounded by the
state (a KV cache, a recurrent state) plus one chunk of activations."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from pipelines.errors import InputError


class ChunkedRunner:
  """Feeds ``tokens [B, n]`` through ``model.step`` ``chunk`` tokens at a time.

  One jitted step per chunk shape (the last chunk may be shorter and compiles once more).
  """

  def __init__(self, model: nnx.Module, chunk: int):
    if chunk < 1:
      raise InputError(f"chunk must be >= 1, got {chunk}")
    self.model, self.chunk = model, chunk
    self.graphdef, self.state = nnx.split(model)

    @jax.jit
    def step(state, tokens, dstate, targets):
      logits, dstate = nnx.merge(self.graphdef, state).step(tokens, dstate)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      return logits, nll, dstate

    self._step = step

  def run(
    self,
    tokens: np.ndarray,
    targets: np.ndarray | None = None,
    *,
    keep_logits: bool = True,
    progress: bool = False,
    on_chunk: Callable[[int], None] | None = None,
  ) -> tuple[np.ndarray | None, np.ndarray]:
    """Returns (logits ``[B, n, V]`` or None, per-token nll ``[B, n]`` against ``targets``)."""
    tokens = np.asarray(tokens, np.int32)
    b, n = tokens.shape
    if targets is None:
      targets = np.zeros_like(tokens)
    dstate = self.model.init_state(b, n)
    logits_out, nll_out = [], []
    for lo in tqdm(range(0, n, self.chunk), desc="stream", disable=not progress, leave=False):
      hi = min(lo + self.chunk, n)
      logits, nll, dstate = self._step(
        self.state, jnp.asarray(tokens[:, lo:hi]), dstate, jnp.asarray(targets[:, lo:hi])
      )
      if keep_logits:
        logits_out.append(np.asarray(logits))
      nll_out.append(np.asarray(nll))
      if on_chunk is not None:
        on_chunk(hi)
    logits = np.concatenate(logits_out, axis=1) if keep_logits else None
    return logits, np.concatenate(nll_out, axis=1)
