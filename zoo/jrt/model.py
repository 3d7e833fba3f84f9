"""JRT-RNN: BASED with prefix linear attention.

``model(tokens, prefix_len=P)`` encodes the first ``P`` tokens non-causally: each prompt token
reads the memory of the whole prompt, written by separate encoder key/value projections, and the
sliding-window layers see the prompt bidirectionally (prefix-LM mask). Tokens after the prompt are
causal. Decoding: ``model.step(prompt, state, prefix=True)`` once, then ``step`` as usual.
"""

from __future__ import annotations

from flax import nnx

from zoo.jrt.config import JRTConfig
from zoo.layers.linear_attention import LinearAttention
from zoo.layers.recurrent_lm import AttentionMixer, RecurrentLM


class JRT(RecurrentLM):
  """``logits, aux = model(tokens [B,T], prefix_len=P)``; decode with ``init_state`` / ``step``."""

  def __init__(self, config: JRTConfig, *, rngs: nnx.Rngs):
    c = config
    mixers = []
    for i in range(c.n_layers):
      if i in c.attention_layers:
        mixer = AttentionMixer(
          c.d_model,
          c.n_heads,
          c.resolved_head_dim,
          window=c.window,
          implementation=c.attention_impl,
          conv_width=c.conv_width,
          rngs=rngs,
        )
      else:
        mixer = LinearAttention(
          c.d_model,
          c.n_heads,
          c.feature_dim,
          c.resolved_head_dim,
          feature_map="taylor",
          normalize=True,
          conv_width=c.conv_width,
          prefix_kv=True,
          norm_eps=c.norm_eps,
          chunk_size=c.chunk_size,
          implementation=c.memory_impl,
          rngs=rngs,
        )
      mixers.append(mixer)
    super().__init__(c, mixers, rngs=rngs)
