"""Titans blocks that see the whole (persistent-prefixed) sequence: LMM, MAG and MAL.

Each block maps ``x [B,T,D]`` with its own decode state; the persistent tokens are a prefix of
the sequence (Titans eq. 26-31), so every block here decodes token by token or by chunks
through the same code as the forward.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ops.attention import Mask
from zoo.layers.attention import Attention
from zoo.layers.mlp import SwiGLU
from zoo.layers.neural_memory import NeuralMemory, memory_hidden
from zoo.layers.norms import RMSNorm
from zoo.layers.remat import RematBlock, checkpointed
from zoo.titans.config import TitansConfig


def build_memory(c: TitansConfig, *, rngs: nnx.Rngs) -> NeuralMemory:
  """The long-term memory layer of a config (shared by every variant)."""
  hd = c.resolved_head_dim
  return NeuralMemory(
    c.d_model,
    c.n_heads,
    hd,
    hidden=memory_hidden(hd, c.memory_depth, c.memory_expansion),
    chunk_size=c.chunk_size,
    conv_size=c.conv_size,
    lr_max=c.memory_lr_max,
    omega_window=c.omega_window,
    feature_map=c.feature_map,
    objective=c.objective,
    optimizer=c.optimizer,
    ns_steps=c.ns_steps,
    activation=c.activation,
    learn_omega_weights=c.learn_omega_weights,
    implementation=c.memory_impl,
    rngs=rngs,
  )


def _window_attention(c: TitansConfig, *, rngs: nnx.Rngs) -> Attention:
  # Sliding window whose sinks are the persistent tokens (Titans' SW-Attn*: the prefix stays
  # visible however far the window has moved).
  return Attention(
    c.d_model,
    c.n_heads,
    c.n_heads,
    c.resolved_head_dim,
    rope_base=c.rope_base,
    mask=Mask(causal=True, window=c.window, sinks=c.n_persistent),
    implementation=c.attention_impl,
    rngs=rngs,
  )


class SequenceBlock(RematBlock, nnx.Module):
  """Pre-norm residual block; ``variant`` picks how memory and attention combine.

  - ``lmm``: ``x += M(x)``; ``x += MLP(x)``.
  - ``mag``: ``x += SWA(x) * sigmoid(M(x))`` (Titans eq. 28, the gate as a sigmoid of the
    memory read); ``x += MLP(x)``.
  - ``mal``: ``x += M(x)``; ``x += SWA(x)``; ``x += MLP(x)``.
  """

  def __init__(self, config: TitansConfig, *, rngs: nnx.Rngs):
    c = config
    self.variant = c.variant
    self.mem_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
    self.memory = build_memory(c, rngs=rngs)
    if c.variant == "mal":  # MAG reads memory and attention from the same normalised input
      self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
    if c.variant in ("mag", "mal"):
      self.attn = _window_attention(c, rngs=rngs)
    self.mlp_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
    self.mlp = SwiGLU(c.d_model, c.d_ff, rngs=rngs)

  def _mix(self, x, mem_fn, attn_fn):
    if self.variant == "mag":
      h = self.mem_norm(x)
      m, mem_state = mem_fn(h)
      a, attn_state = attn_fn(h)
      x = x + a * jax.nn.sigmoid(m)
    else:
      m, mem_state = mem_fn(self.mem_norm(x))
      x = x + m
      attn_state = None
      if self.variant == "mal":
        a, attn_state = attn_fn(self.attn_norm(x))
        x = x + a
    return x + self.mlp(self.mlp_norm(x)), mem_state, attn_state

  @checkpointed
  def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """``x [B,T,D]``, ``positions [B,T]`` -> ``(x, final memory state)``."""
    x, mem_state, _ = self._mix(
      x, lambda h: self.memory(h), lambda h: (self.attn(h, positions), None)
    )
    return x, mem_state

  def init_state(self, batch: int, cache_len: int, dtype) -> dict[str, Any]:
    state = {"memory": self.memory.init_state(batch)}
    if self.variant in ("mag", "mal"):
      state["attn"] = self.attn.init_cache(batch, cache_len, dtype)
    return state

  def step(self, x: jax.Array, state: dict[str, Any], lengths: jax.Array):
    """Feeds ``x [B,t,D]``; ``lengths [B]`` counts tokens already cached (prefix included)."""
    x, mem_state, attn_state = self._mix(
      x,
      lambda h: self.memory(h, state["memory"]),
      lambda h: self.attn.step(h, state["attn"], lengths),
    )
    new = {"memory": mem_state}
    if attn_state is not None:
      new["attn"] = attn_state
    return x, new


def persistent_init(key, shape, dtype):
  return 0.02 * jax.random.normal(key, shape, dtype)
