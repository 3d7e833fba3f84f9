"""BASED: Taylor linear attention layers interleaved with sliding-window softmax attention."""

from __future__ import annotations

from flax import nnx

from zoo.based.config import BasedConfig
from zoo.layers.linear_attention import LinearAttention
from zoo.layers.recurrent_lm import AttentionMixer, RecurrentLM


class Based(RecurrentLM):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``."""

  def __init__(self, config: BasedConfig, *, rngs: nnx.Rngs):
    c = config
    mixers = []
    for i in range(c.n_layers):
      if i in c.attention_layers:
        mixers.append(
          AttentionMixer(
            c.d_model,
            c.n_heads,
            c.resolved_head_dim,
            window=c.window,
            implementation=c.attention_impl,
            conv_width=c.conv_width,
            rngs=rngs,
          )
        )
      else:
        mixers.append(
          LinearAttention(
            c.d_model,
            c.n_heads,
            c.feature_dim,
            c.resolved_head_dim,
            feature_map="taylor",
            normalize=True,
            conv_width=c.conv_width,
            norm_eps=c.norm_eps,
            chunk_size=c.chunk_size,
            implementation=c.memory_impl,
            rngs=rngs,
          )
        )
    super().__init__(c, mixers, rngs=rngs)
