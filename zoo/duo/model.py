"""DuoAttention: per-KV-head choice between full attention and sinks+window attention.

Forward: one ``ops.attention`` call with one Mask per KV-head group. Decode: retrieval heads
keep a full KV cache, streaming heads a :class:`SinkCache` of ``sinks + window`` entries, so
their memory does not grow. Gate mode (``gated_hidden``) mixes both per head with the learned
gates ``alpha`` (DuoAttention Sec. 3.2), which :func:`zoo.duo.gates.optimize_gates` trains.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import ops.attention as attn_ops
from zoo.duo.config import DuoConfig
from zoo.interface import ZooModel
from zoo.layers.cache import SinkCache, forward_blocks, step_blocks
from zoo.layers.params import param
from zoo.transformer.model import Transformer


class DuoAttention(ZooModel):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``.

  One stream per row: the streaming heads' sinks are the stream's first tokens, so a packed
  row's later documents would have none. Packed ``segment_ids`` are refused (ValueError) and
  the training loader feeds one document per row.
  """

  accepts_segment_ids = False

  @property
  def max_len(self) -> int:
    return self.backbone.config.max_len

  def __init__(self, config: DuoConfig, *, rngs: nnx.Rngs):
    self.config = config
    b = config.backbone
    self.backbone = Transformer(b, rngs=rngs)
    # alpha: 1 = retrieval (full), 0 = streaming; only trained by optimize_gates.
    self.gates = param(
      rngs, jax.nn.initializers.ones, (b.n_layers, b.n_kv_heads), ("layers", "kv_heads")
    )
    self.stream = SinkCache(
      config.sinks, config.window, shift=False, implementation=b.attention_impl
    )

  @property
  def stream_mask(self) -> attn_ops.Mask:
    return attn_ops.Mask(causal=True, window=self.config.window, sinks=self.config.sinks)

  def masks(self, layer: int) -> tuple[attn_ops.Mask, ...]:
    """One Mask per KV head; ``ops.attention`` applies mask g to that head's query group."""
    keep = self.config.retrieval(layer)
    n = self.config.backbone.n_kv_heads
    return tuple(attn_ops.Mask() if h in keep else self.stream_mask for h in range(n))

  def _rotate(self, attn, x, positions):
    # one RoPE length for forward and decode (only dynamic NTK depends on it)
    return attn.rotate(x, positions, self.config.backbone.max_len)

  def _qkv(self, attn, h):
    b, t, _ = h.shape
    q, k, v = attn.project(h)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return self._rotate(attn, q, pos), self._rotate(attn, k, pos), v

  def __call__(
    self, tokens: jax.Array, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, Any]]:
    """``tokens [B,T]`` -> ``(logits [B,T,vocab] f32, {})`` with the per-head masks."""
    if segment_ids is not None:
      raise ValueError(
        "DuoAttention takes one stream per row, not packed segment_ids (the streaming heads' "
        "sinks are the stream's first tokens); feed one document per row"
      )

    def attend(i, attn, h):
      q, k, v = self._qkv(attn, h)
      o = attn_ops.dot_product_attention(
        q, k, v, mask=self.masks(i), implementation=attn.implementation
      )
      return attn.out(o)

    x = forward_blocks(self.backbone, self.backbone.embed_tokens(tokens), attend)
    return self.backbone.logits(x), {}

  def gated_hidden(self, tokens: jax.Array) -> jax.Array:
    """Final hidden states ``[B,T,D]`` with every head mixing ``alpha * full + (1 - alpha) *
    streaming`` (alpha clipped to [0, 1]); what the gate optimisation distils."""
    alpha = jnp.clip(self.gates[...], 0.0, 1.0)

    def attend(i, attn, h):
      q, k, v = self._qkv(attn, h)
      full = attn_ops.dot_product_attention(
        q, k, v, mask=attn_ops.Mask(), implementation=attn.implementation
      )
      stream = attn_ops.dot_product_attention(
        q, k, v, mask=self.stream_mask, implementation=attn.implementation
      )
      g = jnp.repeat(alpha[i], attn.n_heads // attn.n_kv_heads)[:, None].astype(full.dtype)
      return attn.out(g * full + (1 - g) * stream)

    return forward_blocks(self.backbone, self.backbone.embed_tokens(tokens), attend)

  def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
    """Per layer: ``full`` k/v ``[B, max_len, R, Dh]`` for the R retrieval heads and a
    constant-size ``stream`` sink+window cache for the others."""
    c = self.config.backbone
    max_len = max_len or c.max_len
    dt, dh = self.backbone.dtype, c.resolved_head_dim
    caches = []
    for i in range(c.n_layers):
      r = len(self.config.retrieval(i))
      shape = (batch, max_len, r, dh)
      caches.append({
        "full": {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)},
        "stream": self.stream.init_heads(batch, c.n_kv_heads - r, dh, dt),
      })  # fmt: skip
    return {"lengths": jnp.zeros((batch,), jnp.int32), "caches": caches}

  def step(self, tokens: jax.Array, state: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``tokens [B,t]``; returns their logits and the new state."""
    lengths = state["lengths"]
    x = self.backbone.embed_tokens(tokens)
    x, caches = step_blocks(
      self.backbone, x, state["caches"],
      lambda i, attn, h, cache: self._step_layer(i, attn, h, cache, lengths),
    )  # fmt: skip
    return self.backbone.logits(x), {"lengths": lengths + tokens.shape[1], "caches": caches}

  def _step_layer(self, layer, attn, h, cache, lengths):
    b, t, _ = h.shape
    kh = attn.n_kv_heads
    g = attn.n_heads // kh
    keep = self.config.retrieval(layer)
    rest = tuple(i for i in range(kh) if i not in keep)
    q, k, v = attn.project(h)
    q = q.reshape(b, t, kh, g, -1)
    out = jnp.zeros(q.shape, jnp.float32)
    new = {}
    if keep:
      idx = jnp.array(keep)
      pos = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
      qr = self._rotate(attn, q[:, :, idx].reshape(b, t, len(keep) * g, -1), pos)
      kr = self._rotate(attn, k[:, :, idx], pos)
      write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))
      full = cache["full"]
      kc = write(full["k"], kr.astype(full["k"].dtype), lengths)
      vc = write(full["v"], v[:, :, idx].astype(full["v"].dtype), lengths)
      o = attn_ops.decode_attention(qr, kc, vc, lengths=lengths + t, mask=attn_ops.Mask())
      out = out.at[:, :, idx].set(o.reshape(b, t, len(keep), g, -1).astype(jnp.float32))
      new["full"] = {"k": kc, "v": vc}
    else:
      new["full"] = cache["full"]
    if rest:
      idx = jnp.array(rest)
      qs = q[:, :, idx].reshape(b, t, len(rest) * g, -1)
      rotate = lambda x, p: self._rotate(attn, x, p)  # noqa: E731
      o, new["stream"] = self.stream.attend_step(
        rotate, qs, k[:, :, idx], v[:, :, idx], cache["stream"], lengths
      )
      out = out.at[:, :, idx].set(o.reshape(b, t, len(rest), g, -1).astype(jnp.float32))
    else:
      new["stream"] = cache["stream"]
    return attn.out(out.reshape(b, t, kh * g, -1).astype(h.dtype)), new


def from_transformer(model: Transformer, **options: Any) -> DuoAttention:
  """DuoAttention around ``model``'s parameters (copied); options are DuoConfig fields."""
  config = DuoConfig(vocab_size=model.config.vocab_size, backbone=model.config, **options)
  wrapped = DuoAttention(config, rngs=nnx.Rngs(0))
  nnx.update(wrapped.backbone, nnx.state(model))
  return wrapped
