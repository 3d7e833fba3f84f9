"""The DuoAttention head-gate optimisation (Sec. 3.2) and reading retrieval heads off the gates.

The backbone is frozen; only ``alpha [L, K]`` is trained so that the mixed model's final
hidden states match the unchanged model's on long-context (passkey) inputs, with an L1 push of
every gate towards streaming. Heads whose gate stays high are the retrieval heads.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zoo.duo.model import DuoAttention
from zoo.layers.cache import forward_blocks


def teacher_hidden(model: DuoAttention, tokens: jax.Array) -> jax.Array:
  """Final hidden states ``[B,T,D]`` of the backbone with its own attention layers."""
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = model.backbone.embed_tokens(tokens)
  return forward_blocks(model.backbone, x, lambda i, attn, h: attn(h, pos))


def optimize_gates(
  model: DuoAttention,
  batches: Iterable[jax.Array],
  *,
  lr: float = 0.02,
  l1: float = 0.05,
) -> np.ndarray:
  """Trains the gates of ``model`` (in place) on ``batches`` of tokens ``[B,T]`` int32.

  Loss per batch: mean squared distance between mixed and original final hidden states
  (normalised by the original's mean square) plus ``l1 * mean(alpha)``. Gates are clipped to
  [0, 1] after every Adam step.

  Returns:
    the final gates ``[L, K]`` float32.
  """
  is_gate = lambda path, x: bool(path) and path[-1] == "gates"  # noqa: E731
  graphdef, alpha, rest = nnx.split(model, is_gate, ...)
  tx = optax.adam(lr)

  def hidden_loss(alpha, tokens):
    m = nnx.merge(graphdef, alpha, rest)
    ref = jax.lax.stop_gradient(teacher_hidden(m, tokens))
    out = m.gated_hidden(tokens)
    dist = jnp.mean((out - ref) ** 2) / (jnp.mean(ref**2) + 1e-6)
    return dist + l1 * jnp.mean(jnp.clip(m.gates[...], 0.0, 1.0))

  @jax.jit
  def step(alpha, opt, tokens):
    g = jax.grad(hidden_loss)(alpha, tokens)
    upd, opt = tx.update(g, opt, alpha)
    alpha = optax.apply_updates(alpha, upd)
    return jax.tree.map(lambda a: jnp.clip(a, 0.0, 1.0), alpha), opt

  opt = tx.init(alpha)
  for tokens in batches:
    alpha, opt = step(alpha, opt, jnp.asarray(tokens))
  nnx.update(model, alpha)
  return np.asarray(model.gates[...])


def retrieval_heads_from_gates(gates, threshold: float = 0.5) -> tuple[tuple[int, ...], ...]:
  """Per layer, the KV heads whose gate exceeds ``threshold`` (``DuoConfig.retrieval_heads``)."""
  gates = np.asarray(gates)
  return tuple(tuple(int(h) for h in np.flatnonzero(row > threshold)) for row in gates)
