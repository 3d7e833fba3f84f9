"""DeltaNet (and, with a decay and an output gate, gated DeltaNet) on ``gated_delta_rule``."""

from __future__ import annotations

from flax import nnx

from zoo.deltanet.config import DeltaNetConfig
from zoo.layers.linear_attention import LinearAttention
from zoo.layers.recurrent_lm import AttentionMixer, RecurrentLM


def build_mixers(c: DeltaNetConfig, *, gated: bool, rngs: nnx.Rngs) -> list[nnx.Module]:
  """One mixer per layer: delta-rule memory, or softmax attention at ``attention_layers``."""
  mixers = []
  for i in range(c.n_layers):
    if i in c.attention_layers:
      mixer = AttentionMixer(
        c.d_model,
        c.n_heads,
        c.resolved_head_dim,
        window=c.window,
        implementation=c.attention_impl,
        rngs=rngs,
      )
    else:
      mixer = LinearAttention(
        c.d_model,
        c.n_heads,
        c.resolved_head_dim,
        c.resolved_head_dim,
        # The short convolution already ends in SiLU; without it the map applies SiLU itself.
        feature_map="l2" if c.conv_width else "silu_l2",
        rule="delta",
        decay="gated" if gated else "none",
        decay_init=(c.a_init_range, c.dt_init_range) if gated else None,
        conv_width=c.conv_width,
        output_norm=True,
        output_gate=c.output_gate,
        norm_eps=c.norm_eps,
        chunk_size=c.chunk_size,
        implementation=c.memory_impl,
        rngs=rngs,
      )
    mixers.append(mixer)
  return mixers


class DeltaNet(RecurrentLM):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``."""

  def __init__(self, config: DeltaNetConfig, *, rngs: nnx.Rngs):
    super().__init__(config, build_mixers(config, gated=False, rngs=rngs), rngs=rngs)
