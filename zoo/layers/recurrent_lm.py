"""A language-model stack over per-layer mixers (recurrent memories and softmax attention).

The recurrent families (BASED, DeltaNet, gated DeltaNet, Mamba-2, MoM, JRT) share everything but
their mixers: embedding, pre-norm residual blocks with an optional SwiGLU, final norm, logits,
and the decode loop. A mixer is a module with

- ``__call__(x [B,T,D], *, positions, segment_ids, prefix_len) -> (y [B,T,D], aux dict)``,
- ``init_state(batch, max_len, dtype) -> pytree``,
- ``step(x [B,t,D], state, *, lengths, prefix) -> (y [B,t,D], state)``,
- ``state_size() -> int | None`` (floats of recall state per sequence; None = grows with T).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import ops.attention as attn_ops
from ops.attention import Mask
from zoo.interface import ZooModel
from zoo.layers.attention import Attention
from zoo.layers.embedding import TokenEmbedding
from zoo.layers.mlp import SwiGLU
from zoo.layers.norms import RMSNorm
from zoo.layers.positions import document_positions
from zoo.layers.remat import RematBlock, checkpointed


class AttentionMixer(nnx.Module):
  """Softmax attention as a mixer: full causal (KV cache of ``max_len``) or a sliding window
  (a shift buffer of the last ``window`` keys, so decoding cost stays constant).

  ``conv_width > 0``: short causal convolutions on q, k, v (``zoo.layers.attention``), the
  same local mixing the recurrent mixers have; their buffers join the decode state.
  """

  def __init__(
    self,
    d_model: int,
    n_heads: int,
    head_dim: int,
    *,
    window: int | None = None,
    implementation: str | None = None,
    conv_width: int = 0,
    rngs: nnx.Rngs,
  ):
    self.window = window
    self.attn = Attention(
      d_model,
      n_heads,
      n_heads,
      head_dim,
      mask=Mask(causal=True, window=window),
      implementation=implementation,
      conv_width=conv_width,
      rngs=rngs,
    )

  def __call__(self, x, *, positions, segment_ids=None, prefix_len=None, **_):
    """``prefix_len``: the first tokens see each other bidirectionally (JRT-RNN prefix-LM)."""
    if not prefix_len:
      return self.attn(x, positions, segment_ids), {}
    q, k, v, _ = self.attn.convolved_qkv(x, positions, x.shape[1], segment_ids=segment_ids)
    seg = None if segment_ids is None else (segment_ids, segment_ids)
    mask = Mask(causal=True, window=self.window, prefix=int(prefix_len))
    o = attn_ops.dot_product_attention(
      q, k, v, mask=mask, segment_ids=seg, implementation=self.attn.implementation
    )
    return self.attn.out(o), {}

  def state_size(self) -> int | None:
    if self.window is None:
      return None
    return 2 * self.window * self.attn.n_kv_heads * self.attn.head_dim

  def init_state(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict[str, jax.Array]:
    if self.window is None:
      return self.attn.init_cache(batch, max_len, dtype)
    shape = (batch, self.window, self.attn.n_kv_heads, self.attn.head_dim)
    state = {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "pos": jnp.full((batch, self.window), -1, jnp.int32),  # -1: empty slot
    }
    if self.attn.conv is not None:
      state["conv"] = {n: c.init_state(batch, dtype) for n, c in self.attn.conv.items()}
    return state

  def step(self, x, state, *, lengths, prefix=False, **_):
    """``prefix=True``: this chunk is the whole prompt (fresh state), read bidirectionally."""
    t, w = x.shape[1], self.window
    if self.window is None:
      if not prefix:
        return self.attn.step(x, state, lengths)
      return self._full_prefix_step(x, state, lengths)
    positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    q, k, v, conv = self.attn.convolved_qkv(x, positions, x.shape[1], conv_state=state.get("conv"))
    keys = jnp.concatenate([state["k"], k.astype(state["k"].dtype)], axis=1)
    vals = jnp.concatenate([state["v"], v.astype(state["v"].dtype)], axis=1)
    kpos = jnp.concatenate([state["pos"], positions], axis=1)
    diff = positions[:, :, None] - kpos[:, None, :]  # [B,t,W+t]
    visible = (kpos[:, None, :] >= 0) & (diff >= 0) & (diff < w)
    if prefix:
      visible = visible | (kpos[:, None, :] >= 0)
    b, _, h, d = q.shape
    kh = keys.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d).astype(jnp.float32)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(jnp.float32)) * d**-0.5
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), vals.astype(jnp.float32))
    new = {"k": keys[:, -w:], "v": vals[:, -w:], "pos": kpos[:, -w:]}
    if conv is not None:
      new["conv"] = conv
    return self.attn.out(o.reshape(b, t, h, d).astype(x.dtype)), new

  def _full_prefix_step(self, x, cache, lengths):
    # Attention.step with a prefix mask: the chunk's own keys are all visible to it.
    t = x.shape[1]
    positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    q, k, v, conv = self.attn.convolved_qkv(
      x, positions, cache["k"].shape[1], conv_state=cache.get("conv")
    )
    write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))
    new = {
      "k": write(cache["k"], k.astype(cache["k"].dtype), lengths),
      "v": write(cache["v"], v.astype(cache["v"].dtype), lengths),
    }
    if conv is not None:
      new["conv"] = conv
    o = attn_ops.decode_attention(
      q, new["k"], new["v"], lengths=lengths + t, mask=Mask(causal=True, prefix=t)
    )
    return self.attn.out(o.astype(x.dtype)), new


class Block(RematBlock, nnx.Module):
  """Pre-norm residual block: the mixer, then a SwiGLU MLP when ``d_ff > 0``."""

  def __init__(self, d_model: int, mixer: nnx.Module, d_ff: int, eps: float, *, rngs: nnx.Rngs):
    self.mixer_norm = RMSNorm(d_model, eps=eps, rngs=rngs)
    self.mixer = mixer
    self.mlp_norm = RMSNorm(d_model, eps=eps, rngs=rngs) if d_ff else None
    self.mlp = SwiGLU(d_model, d_ff, rngs=rngs) if d_ff else None

  @checkpointed
  def __call__(self, x, **kw):
    h, aux = self.mixer(self.mixer_norm(x), **kw)
    x = x + h
    if self.mlp is not None:
      x = x + self.mlp(self.mlp_norm(x))
    return x, aux

  def step(self, x, state, **kw):
    h, state = self.mixer.step(self.mixer_norm(x), state, **kw)
    x = x + h
    if self.mlp is not None:
      x = x + self.mlp(self.mlp_norm(x))
    return x, state


class RecurrentLM(TokenEmbedding, ZooModel):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``.

  Subclasses build their mixers and call ``super().__init__(config, mixers, rngs=rngs)``; the
  config needs ``vocab_size, d_model, d_ff, norm_eps, tie_embeddings, dtype, max_len``.
  """

  def __init__(self, config: Any, mixers: Sequence[nnx.Module], *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.init_embedding(c, rngs=rngs)
    self.blocks = nnx.List([Block(c.d_model, m, c.d_ff, c.norm_eps, rngs=rngs) for m in mixers])
    self.init_output(c, rngs=rngs)

  def state_size(self) -> int | None:
    """Floats of recall state per sequence over all layers (None if some layer grows with T)."""
    sizes = [b.mixer.state_size() for b in self.blocks]
    return None if any(s is None for s in sizes) else sum(sizes)

  def __call__(
    self, tokens: jax.Array, segment_ids: jax.Array | None = None, *, prefix_len: int | None = None
  ) -> tuple[jax.Array, dict[str, Any]]:
    """Args: ``tokens [B,T]`` int32; ``segment_ids [B,T]`` (packed documents: states reset);
    ``prefix_len`` (JRT-RNN models: the first tokens are read non-causally).

    Returns: ``(logits [B,T,vocab] float32, {"layers": [per-layer aux dict]})``.
    """
    positions = document_positions(tokens.shape, segment_ids)
    x = self.embed_tokens(tokens)
    layer_aux = []
    for block in self.blocks:
      kw = {"positions": positions, "segment_ids": segment_ids}
      if prefix_len:
        kw["prefix_len"] = prefix_len
      x, aux = block(x, **kw)
      layer_aux.append(aux)
    return self.logits(x), {"layers": layer_aux}

  def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
    """Empty decode state: per-layer mixer states and the per-sequence lengths."""
    max_len = max_len or self.config.max_len
    return {
      "lengths": jnp.zeros((batch,), jnp.int32),
      "layers": [b.mixer.init_state(batch, max_len, self.dtype) for b in self.blocks],
    }

  def step(
    self, tokens: jax.Array, state: dict[str, Any], *, prefix: bool = False
  ) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``tokens [B,t]`` (one token or a chunk); returns their logits and the new state.

    ``prefix=True`` (JRT-RNN models, first call only) encodes the chunk as a non-causal prompt.
    """
    lengths = state["lengths"]
    x = self.embed_tokens(tokens)
    new_states = []
    for block, s in zip(self.blocks, state["layers"]):
      kw = {"lengths": lengths}
      if prefix:
        kw["prefix"] = True
      x, s = block.step(x, s, **kw)
      new_states.append(s)
    return self.logits(x), {"lengths": lengths + tokens.shape[1], "layers": new_states}
