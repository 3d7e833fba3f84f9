"""Token embedding, final norm and output projection shared by the language models."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers.norms import RMSNorm
from zoo.layers.params import dtype_of, normal, param


class TokenEmbedding:
  """Mixin of a language model whose config has ``vocab_size, d_model, norm_eps,
  tie_embeddings, dtype``: the table ``embed [V,D]``, ``final_norm``, and ``unembed [D,V]``
  unless the output projection is the transposed table (tied, as in Hugging Face Llama
  checkpoints)."""

  config: Any

  def init_embedding(self, config: Any, *, rngs: nnx.Rngs) -> None:
    """The token table (first, so parameter initialisation order stays that of the family)."""
    c = config
    self.embed = param(rngs, normal(0.02), (c.vocab_size, c.d_model), ("vocab", "embed"))

  def init_output(self, config: Any, *, rngs: nnx.Rngs) -> None:
    """The final norm and, untied, the output projection (after the blocks)."""
    c = config
    self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
    if not c.tie_embeddings:
      self.unembed = param(rngs, normal(0.02), (c.d_model, c.vocab_size), ("embed", "vocab"))

  @property
  def dtype(self) -> jnp.dtype:
    """The compute dtype (parameters stay float32)."""
    return dtype_of(self.config.dtype)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """``tokens [B,T]`` int32 -> ``[B,T,D]`` in the compute dtype."""
    return jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm and output projection: ``x [B,T,D]`` -> float32 ``[B,T,V]``."""
    x = self.final_norm(x)
    w = self.embed[...].T if self.config.tie_embeddings else self.unembed[...]
    return jnp.einsum("btd,dv->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
