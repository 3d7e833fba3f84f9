"""Mixture of memories: a router sends each token to ``top_k`` of ``n_memories`` linear memories.

Each memory has its own key/value projections and gates; the query is shared. A memory that a
token is not routed to is left untouched by it (``k = beta = g = 0`` keep ``S`` unchanged) and
contributes nothing to its output. All memories (and the shared one) run as extra heads of one
``gated_delta_rule`` call: ``[B,T,M*H,K]``. The paper gathers routed tokens per memory instead;
the result is the same and the dense form is simpler to shard and to step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import ops.memory as mem_ops
from zoo.layers import parallel
from zoo.layers.conv import ShortConv
from zoo.layers.linear_attention import decay_params, l2_normalize, log_decay
from zoo.layers.norms import RMSNorm
from zoo.layers.params import fan_in, param
from zoo.layers.recurrent_lm import AttentionMixer, RecurrentLM
from zoo.mom.config import MoMConfig


def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k routing: ``logits [B,T,M]`` -> ``(weights [B,T,M], probs [B,T,M])`` float32.

  ``weights`` are the router probabilities of the chosen memories renormalised to sum to 1
  (MoM Eq. 3), zero elsewhere.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top, idx = jax.lax.top_k(probs, top_k)
  chosen = jnp.sum(jax.nn.one_hot(idx, probs.shape[-1], dtype=probs.dtype), axis=-2)
  weights = chosen * probs / jnp.sum(top, axis=-1, keepdims=True)
  return weights, probs


class MoMMixer(nnx.Module):
  """``x [B,T,D] -> [B,T,D]`` over ``n_memories`` (+1 shared) memories of ``H`` heads."""

  def __init__(self, c: MoMConfig, *, rngs: nnx.Rngs):
    D, H, K = c.d_model, c.n_heads, c.resolved_head_dim
    M = c.n_memories + int(c.shared_memory)
    self.n_memories, self.n_total, self.top_k = c.n_memories, M, c.top_k
    self.shared, self.rule, self.gated = c.shared_memory, c.rule, c.gated
    self.n_heads, self.head_dim = H, K
    self.chunk_size, self.implementation = c.chunk_size, c.memory_impl
    init = fan_in([D])
    mk = (None, "embed", "heads", "head_dim")
    self.w_router = param(rngs, init, (D, c.n_memories), ("embed", None))
    self.wq = param(rngs, init, (D, H, K), ("embed", "heads", "head_dim"))
    self.wk = param(rngs, init, (M, D, H, K), mk)
    self.wv = param(rngs, init, (M, D, H, K), mk)
    if c.rule == "delta":
      self.w_beta = param(rngs, init, (M, D, H), (None, "embed", "heads"))
    if c.gated:
      self.w_a = param(rngs, init, (M, D, H), (None, "embed", "heads"))
      self.a_log, self.dt_bias = decay_params(rngs, M * H, c.a_init_range, c.dt_init_range)
    width = c.conv_width
    self.conv = (
      nnx.Dict(
        {
          "q": ShortConv((H, K), ("heads", "head_dim"), width, rngs=rngs),
          "k": ShortConv((M, H, K), (None, "heads", "head_dim"), width, rngs=rngs),
          "v": ShortConv((M, H, K), (None, "heads", "head_dim"), width, rngs=rngs),
        }
      )
      if width
      else None
    )
    self.norm = RMSNorm(K, eps=c.norm_eps, axis_name="head_dim", rngs=rngs)
    self.w_gate = param(rngs, init, (D, H, K), ("embed", "heads", "head_dim"))
    self.wo = param(rngs, fan_in([H, K]), (H, K, D), ("heads", "head_dim", "embed"))

  def state_size(self) -> int:
    return self.n_total * self.n_heads * self.head_dim * self.head_dim

  def _project(self, x):
    dt = x.dtype
    return {
      "q": jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt)),
      "k": jnp.einsum("btd,mdhk->btmhk", x, self.wk[...].astype(dt)),
      "v": jnp.einsum("btd,mdhk->btmhk", x, self.wv[...].astype(dt)),
    }

  def _memory_inputs(self, x, u):
    """Routed op inputs over ``M*H`` heads, plus ``weights [B,T,M]`` and router ``probs``."""
    b, t = x.shape[:2]
    M, H, K = self.n_total, self.n_heads, self.head_dim
    x32 = x.astype(jnp.float32)
    weights, probs = route(x32 @ self.w_router[...], self.top_k)
    if self.shared:
      weights = jnp.concatenate([weights, jnp.ones((b, t, 1), jnp.float32)], axis=-1)
    active = (weights > 0).astype(jnp.float32)  # [B,T,M]
    fmap = l2_normalize if self.conv is not None else lambda a: l2_normalize(jax.nn.silu(a))
    q = jnp.broadcast_to(fmap(u["q"])[:, :, None], (b, t, M, H, K))
    k = fmap(u["k"]) * active[..., None, None].astype(x.dtype)
    v = u["v"] if self.conv is not None else jax.nn.silu(u["v"])
    heads = lambda a: a.reshape(b, t, M * H, *a.shape[4:])
    g = beta = None
    if self.rule == "delta":
      beta = jax.nn.sigmoid(jnp.einsum("btd,mdh->btmh", x32, self.w_beta[...]))
      beta = heads(beta * active[..., None])
    if self.gated:
      a = jnp.einsum("btd,mdh->btmh", x32, self.w_a[...]).reshape(b, t, M * H)
      per_head = jnp.broadcast_to(active[..., None], (b, t, M, H))
      g = log_decay(a, self.a_log[...], self.dt_bias[...]) * heads(per_head)
    return heads(q), heads(k), heads(v), g, beta, weights, probs

  def _output(self, x, o, weights):
    b, t = x.shape[:2]
    o = o.reshape(b, t, self.n_total, self.n_heads, self.head_dim)
    o = jnp.einsum("btmhk,btm->bthk", o.astype(jnp.float32), weights).astype(x.dtype)
    o = self.norm(o)
    o = o * jax.nn.silu(jnp.einsum("btd,dhk->bthk", x, self.w_gate[...].astype(x.dtype)))
    return jnp.einsum("bthk,hkd->btd", o, self.wo[...].astype(x.dtype))

  def _stats(self, weights, probs):
    # Switch-style balance loss: n * sum_m (fraction routed to m) * (mean router prob of m).
    n = self.n_memories
    load = jnp.mean((weights[..., :n] > 0).astype(jnp.float32), axis=(0, 1)) / self.top_k
    balance = n * jnp.sum(load * jnp.mean(probs, axis=(0, 1)))
    return {"router_load": load, "balance_loss": balance}

  def __call__(self, x, *, segment_ids=None, prefix_len=None, **_):
    if prefix_len:
      raise ValueError("MoM has no prefix (JRT) mode")
    u = self._project(x)
    if self.conv is not None:
      u = {n: self.conv[n](a, segment_ids) for n, a in u.items()}
    q, k, v, g, beta, weights, probs = self._memory_inputs(x, u)
    o, state = parallel.gated_delta_rule(
      q,
      k,
      v,
      g=g,
      beta=beta,
      output_final_state=True,
      chunk_size=self.chunk_size,
      segment_ids=segment_ids,
      implementation=self.implementation,
    )
    return self._output(x, o, weights), {"state": state, **self._stats(weights, probs)}

  def init_state(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict[str, Any]:
    del max_len  # constant-size state
    shape = (batch, self.n_total * self.n_heads, self.head_dim, self.head_dim)
    state: dict[str, Any] = {"memory": jnp.zeros(shape, jnp.float32)}
    if self.conv is not None:
      state["conv"] = {n: c.init_state(batch, dtype) for n, c in self.conv.items()}
    return state

  def step(self, x, state, *, prefix=False, **_):
    if prefix:
      raise ValueError("MoM has no prefix (JRT) mode")
    u = self._project(x)
    new: dict[str, Any] = {}
    if self.conv is not None:
      new["conv"] = {}
      for n in u:
        u[n], new["conv"][n] = self.conv[n].step(u[n], state["conv"][n])
    q, k, v, g, beta, weights, _ = self._memory_inputs(x, u)
    if x.shape[1] == 1:
      first = lambda a: None if a is None else a[:, 0]
      o, memory = mem_ops.gated_delta_rule_step(
        q[:, 0], k[:, 0], v[:, 0], g=first(g), beta=first(beta), state=state["memory"]
      )
      o = o[:, None]
    else:
      o, memory = mem_ops.gated_delta_rule(
        q,
        k,
        v,
        g=g,
        beta=beta,
        initial_state=state["memory"],
        output_final_state=True,
        chunk_size=self.chunk_size,
        implementation=self.implementation,
      )
    new["memory"] = memory
    return self._output(x, o, weights), new


class MoM(RecurrentLM):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``.

  ``aux["layers"][i]`` holds the layer's final memory states, ``router_load [n_memories]`` and
  ``balance_loss`` (add it to the training loss to keep memories in use).
  """

  def __init__(self, config: MoMConfig, *, rngs: nnx.Rngs):
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
            rngs=rngs,
          )
        )
      else:
        mixers.append(MoMMixer(c, rngs=rngs))
    super().__init__(c, mixers, rngs=rngs)
