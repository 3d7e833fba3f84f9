"""The Llama-style decoder, built eagerly from its config, used functionally."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ops.attention import Mask
from zoo.interface import ZooModel
from zoo.layers import parallel
from zoo.layers.attention import Attention
from zoo.layers.embedding import TokenEmbedding
from zoo.layers.mlp import SwiGLU
from zoo.layers.norms import RMSNorm
from zoo.layers.params import dtype_of
from zoo.layers.positions import document_positions
from zoo.layers.remat import RematBlock, checkpointed
from zoo.transformer.config import TransformerConfig


class Block(RematBlock, nnx.Module):
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

  @checkpointed
  def __call__(self, x, positions, segment_ids=None):
    x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    return x + self.mlp(self.mlp_norm(x))

  def step(self, x, cache, lengths):
    h, cache = self.attn.step(self.attn_norm(x), cache, lengths)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class Transformer(TokenEmbedding, ZooModel):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``."""

  accepts_positions = True

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.init_embedding(c, rngs=rngs)
    self.blocks = nnx.List([Block(c, layer=i, rngs=rngs) for i in range(c.n_layers)])
    self.init_output(c, rngs=rngs)
    if c.param_dtype != "float32":
      # Stored in the checkpoint's dtype (e.g. an imported bfloat16 model): no float32 copy.
      dt = dtype_of(c.param_dtype)
      for _, var in nnx.iter_graph(self):
        if isinstance(var, nnx.Param):
          var.set_value(var.get_value().astype(dt))

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
