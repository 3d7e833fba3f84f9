"""The Llama-style decoder, built eagerly from its config, used functionally."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ops.attention import Mask
from zoo.layers import parallel
from zoo.layers.attention import Attention
from zoo.layers.mlp import SwiGLU
from zoo.layers.norms import RMSNorm
from zoo.layers.params import dtype_of, normal, param
from zoo.transformer.config import TransformerConfig


class Block(nnx.Module):
  """Pre-norm residual block: attention then SwiGLU."""

  def __init__(self, config: TransformerConfig, *, layer: int = 0, rngs: nnx.Rngs):
    c = config
    window = c.layer_window(layer)
    self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
    self.attn = Attention(
      c.d_model,
      c.n_heads,
      c.n_kv_heads,
      c.resolved_head_dim,
      rope_base=c.rope_base,
      rope_scaling=c.rope_scaling,
      mask=Mask(causal=True, window=window, sinks=c.sinks if window else 0),
      implementation=c.attention_impl,
      conv_width=c.conv_width,
      qkv_bias=c.qkv_bias,
      out_bias=c.out_bias,
      qk_norm=c.qk_norm,
      norm_eps=c.norm_eps,
      rngs=rngs,
    )
    self.mlp_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
    self.mlp = SwiGLU(c.d_model, c.d_ff, rngs=rngs)

  def __call__(self, x, positions, segment_ids=None):
    x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    return x + self.mlp(self.mlp_norm(x))

  def step(self, x, cache, lengths):
    h, cache = self.attn.step(self.attn_norm(x), cache, lengths)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class Transformer(nnx.Module):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.embed = param(rngs, normal(0.02), (c.vocab_size, c.d_model), ("vocab", "embed"))
    self.blocks = nnx.List([Block(c, layer=i, rngs=rngs) for i in range(c.n_layers)])
    self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
    if not c.tie_embeddings:
      self.unembed = param(rngs, normal(0.02), (c.d_model, c.vocab_size), ("embed", "vocab"))
    if c.param_dtype != "float32":
      # Stored in the checkpoint's dtype (e.g. an imported bfloat16 model): no float32 copy.
      dt = dtype_of(c.param_dtype)
      for _, var in nnx.iter_graph(self):
        if isinstance(var, nnx.Param):
          var.set_value(var.get_value().astype(dt))

  @property
  def dtype(self):
    return dtype_of(self.config.dtype)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm and output projection; float32 logits ``[B,T,vocab]``."""
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      w = self.embed[...].T  # tied, as in Hugging Face Llama checkpoints
    else:
      w = self.unembed[...]
    return jnp.einsum("btd,dv->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)

  def __call__(
    self,
    tokens: jax.Array,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, Any]]:
    """Args: ``tokens [B,T]`` int32; ``segment_ids [B,T]`` for packed documents (positions then
    restart at each document unless given). Returns ``(logits [B,T,vocab] f32, aux)``."""
    if positions is None:
      positions = document_positions(tokens.shape, segment_ids)
    # Block boundaries are pinned to the layout (batch, seq, embed) when a mesh is active, so
    # XLA does not pick a different split (e.g. regather the embedding) between blocks.
    x = parallel.constrain(self.embed_tokens(tokens))
    for block in self.blocks:
      x = parallel.constrain(block(x, positions, segment_ids))
    return self.logits(x), {}

  def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
    """Empty decode state: one KV cache per layer and the per-sequence lengths."""
    max_len = max_len or self.config.max_len
    return {
      "lengths": jnp.zeros((batch,), jnp.int32),
      "caches": [b.attn.init_cache(batch, max_len, self.dtype) for b in self.blocks],
    }

  def step(self, tokens: jax.Array, state: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``tokens [B,t]`` (one token or a chunk); returns their logits and the new state."""
    lengths = state["lengths"]
    x = self.embed_tokens(tokens)
    caches = []
    for block, cache in zip(self.blocks, state["caches"]):
      x, cache = block.step(x, cache, lengths)
      caches.append(cache)
    return self.logits(x), {"lengths": lengths + tokens.shape[1], "caches": caches}


def document_positions(shape: tuple[int, int], segment_ids: jax.Array | None) -> jax.Array:
  """Positions ``[B,T]`` that restart at 0 at every document start of ``segment_ids``."""
  b, t = shape
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids is None:
    return idx
  starts = jnp.concatenate(
    [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx
