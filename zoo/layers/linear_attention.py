"""Linear-attention feature maps and a generic recurrent-memory mixer on ``gated_delta_rule``.

One mixer covers BASED's Taylor linear attention, DeltaNet, gated DeltaNet and JRT-RNN's prefix
linear attention: they differ in the feature map, the write rule (additive or delta), the decay
and the output gate/norm. The memory is ``S [B,H,K,V]``; decoding carries it and the short
convolutions' last inputs, so the cost per token does not grow with the context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ops.memory as mem_ops
from zoo.layers import parallel
from zoo.layers.conv import ShortConv
from zoo.layers.norms import RMSNorm
from zoo.layers.params import fan_in, param
from zoo.layers.recurrent_config import A_INIT_RANGE, DT_INIT_RANGE

FeatureMap = Literal["identity", "taylor", "elu", "relu", "l2", "silu_l2"]


def taylor(x: jax.Array) -> jax.Array:
  """BASED's 2nd-order Taylor map: ``[..., K] -> [..., 1 + K + K*K]``.

  ``phi(q) . phi(k) = 1 + q.k / sqrt(K) + (q.k)^2 / (2K)``, the expansion of
  ``exp(q.k / sqrt(K))`` (BASED Sec. 3.1; the scaling follows the reference code).
  """
  d = x.shape[-1]
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
  ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
  return jnp.concatenate([ones, x / d**0.25, outer / (math.sqrt(2.0) * math.sqrt(d))], axis=-1)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "identity": lambda x: x,
  "taylor": taylor,
  "elu": lambda x: jax.nn.elu(x) + 1.0,
  "relu": jax.nn.relu,
  "l2": l2_normalize,
  "silu_l2": lambda x: l2_normalize(jax.nn.silu(x)),
}


def feature_dim(name: str, dim: int) -> int:
  """Width of ``FEATURE_MAPS[name]`` applied to ``dim`` channels."""
  if name not in FEATURE_MAPS:
    raise ValueError(f"unknown feature_map {name!r}; known: {sorted(FEATURE_MAPS)}")
  return 1 + dim + dim * dim if name == "taylor" else dim


class LinearAttention(nnx.Module):
  """Multi-head linear memory ``x [B,T,D] -> [B,T,D]`` through ``ops.memory.gated_delta_rule``.

  Args:
    d_model: D.
    n_heads: H.
    key_dim: per-head query/key width before the feature map.
    value_dim: per-head value width V.
    feature_map: a name in ``FEATURE_MAPS`` applied to queries and keys.
    rule: ``"additive"`` (linear attention) or ``"delta"`` (DeltaNet; write strength
      ``beta = sigmoid(x W_beta)``).
    decay: ``"none"`` or ``"gated"``: per-head data-dependent log decay
      ``g = -exp(A_log) softplus(x W_a + dt_bias)`` (Mamba-2 / gated DeltaNet).
    decay_init: ``(a_init_range, dt_init_range)`` of the gated decay
      (:class:`zoo.layers.recurrent_config.DecayInit`); None: Mamba-2's.
    normalize: divide by ``phi(q) . sum phi(k)`` (classic linear attention); needs positive
      feature maps; computed exactly as one extra value column of ones.
    conv_width: short convolution on q, k, v (0 = none).
    output_norm: RMSNorm over V per head.
    output_gate: multiply by ``silu(x W_gate)`` (gated DeltaNet).
    prefix_kv: separate key/value projections for prefix tokens (JRT-RNN's encoder).
    chunk_size, implementation: passed to the op.
  """

  def __init__(
    self,
    d_model: int,
    n_heads: int,
    key_dim: int,
    value_dim: int,
    *,
    feature_map: FeatureMap = "identity",
    rule: Literal["additive", "delta"] = "additive",
    decay: Literal["none", "gated"] = "none",
    decay_init: tuple[tuple[float, float], tuple[float, float]] | None = None,
    normalize: bool = False,
    conv_width: int = 0,
    output_norm: bool = False,
    output_gate: bool = False,
    prefix_kv: bool = False,
    norm_eps: float = 1e-6,
    chunk_size: int = 64,
    implementation: str | None = None,
    rngs: nnx.Rngs,
  ):
    H, K, V = n_heads, key_dim, value_dim
    self.n_heads, self.key_dim, self.value_dim = H, K, V
    self.feature_map, self.rule, self.decay = feature_map, rule, decay
    self.normalize, self.prefix_kv = normalize, prefix_kv
    self.chunk_size, self.implementation = chunk_size, implementation
    self.kf = feature_dim(feature_map, K)
    init = fan_in([d_model])
    hk, hv = ("embed", "heads", "head_dim"), ("embed", "heads", "head_dim")
    self.wq = param(rngs, init, (d_model, H, K), hk)
    self.wk = param(rngs, init, (d_model, H, K), hk)
    self.wv = param(rngs, init, (d_model, H, V), hv)
    if prefix_kv:
      self.wk_prefix = param(rngs, init, (d_model, H, K), hk)
      self.wv_prefix = param(rngs, init, (d_model, H, V), hv)
    self.wo = param(rngs, fan_in([H, V]), (H, V, d_model), ("heads", "head_dim", "embed"))
    if rule == "delta":
      self.w_beta = param(rngs, init, (d_model, H), ("embed", "heads"))
    if decay == "gated":
      self.w_a = param(rngs, init, (d_model, H), ("embed", "heads"))
      self.a_log, self.dt_bias = decay_params(rngs, H, *(decay_init or ()))
    self.conv = (
      nnx.Dict(
        {
          n: ShortConv((H, d), ("heads", "head_dim"), conv_width, rngs=rngs)
          for n, d in (("q", K), ("k", K), ("v", V))
        }
      )
      if conv_width
      else None
    )
    self.norm = RMSNorm(V, eps=norm_eps, axis_name="head_dim", rngs=rngs) if output_norm else None
    self.w_gate = param(rngs, init, (d_model, H, V), hv) if output_gate else None

  @property
  def scale(self) -> float:
    # Normalised outputs are ratios (any scale cancels); otherwise the usual K^-1/2 on phi(q).
    return 1.0 if self.normalize else self.kf**-0.5

  def state_size(self) -> int:
    """Floats in the memory per sequence (the recall-relevant state; conv buffers excluded)."""
    return self.n_heads * self.kf * (self.value_dim + int(self.normalize))

  def _inputs(self, x, prefix_len=None):
    """Projections before the convolution: ``q, k [B,T,H,K]``, ``v [B,T,H,V]``."""
    proj = lambda w: jnp.einsum("btd,dhk->bthk", x, w[...].astype(x.dtype))
    q, k, v = proj(self.wq), proj(self.wk), proj(self.wv)
    if prefix_len and self.prefix_kv:
      # JRT-RNN: prefix tokens are written by the encoder projections, the rest by the decoder.
      is_prefix = (jnp.arange(x.shape[1]) < prefix_len)[None, :, None, None]
      k = jnp.where(is_prefix, proj(self.wk_prefix), k)
      v = jnp.where(is_prefix, proj(self.wv_prefix), v)
    return q, k, v

  def _gates(self, x):
    """``g [B,T,H]`` float32 log decay or None; ``beta [B,T,H]`` float32 or None."""
    x32 = x.astype(jnp.float32)
    g = beta = None
    if self.decay == "gated":
      g = log_decay(x32 @ self.w_a[...], self.a_log[...], self.dt_bias[...])
    if self.rule == "delta":
      beta = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x32, self.w_beta[...]))
    return g, beta

  def _features(self, q, k, v):
    fmap = FEATURE_MAPS[self.feature_map]
    q, k = fmap(q), fmap(k)
    if self.normalize:
      v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    return q, k, v

  def _output(self, x, o):
    if self.normalize:
      # The last column is phi(q) . sum phi(k) (> 0 for the positive maps this is used with).
      o32 = o.astype(jnp.float32)
      o = (o32[..., :-1] / (o32[..., -1:] + 1e-6)).astype(x.dtype)
    if self.norm is not None:
      o = self.norm(o)
    if self.w_gate is not None:
      o = o * jax.nn.silu(jnp.einsum("btd,dhv->bthv", x, self.w_gate[...].astype(x.dtype)))
    return jnp.einsum("bthv,hvd->btd", o.astype(x.dtype), self.wo[...].astype(x.dtype))

  def __call__(
    self,
    x: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    prefix_len: int | None = None,
    **_: Any,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``x [B,T,D]`` -> ``(y [B,T,D], {"state": S [B,H,K',V']})``.

    ``prefix_len``: JRT-RNN mode, the first ``prefix_len`` tokens read the memory of the whole
    prefix (non-causal); needs the additive rule.
    """
    if prefix_len and self.rule != "additive":
      raise ValueError("prefix_len needs rule='additive' (the delta rule has no non-causal prefix)")
    q, k, v = self._inputs(x, prefix_len)
    if self.conv is not None:
      q, k, v = (self.conv[n](a, segment_ids) for n, a in (("q", q), ("k", k), ("v", v)))
    q, k, v = self._features(q, k, v)
    g, beta = self._gates(x)
    o, state = parallel.gated_delta_rule(
      q,
      k,
      v,
      g=g,
      beta=beta,
      scale=self.scale,
      output_final_state=True,
      chunk_size=self.chunk_size,
      segment_ids=segment_ids,
      prefix_len=prefix_len or None,
      implementation=self.implementation,
    )
    return self._output(x, o), {"state": state}

  def init_state(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict[str, Any]:
    """Zero memory ``[B,H,K',V']`` float32 and zero convolution buffers."""
    del max_len  # constant-size state
    v_width = self.value_dim + int(self.normalize)
    state: dict[str, Any] = {
      "memory": jnp.zeros((batch, self.n_heads, self.kf, v_width), jnp.float32)
    }
    if self.conv is not None:
      state["conv"] = {n: c.init_state(batch, dtype) for n, c in self.conv.items()}
    return state

  def step(
    self, x: jax.Array, state: dict[str, Any], *, prefix: bool = False, **_: Any
  ) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``x [B,t,D]``; ``prefix=True`` treats the chunk as JRT-RNN's non-causal prompt
    (the state must be fresh). Returns ``(y [B,t,D], new state)``."""
    t = x.shape[1]
    q, k, v = self._inputs(x, t if prefix else None)
    new_state: dict[str, Any] = {}
    if self.conv is not None:
      outs, new_state["conv"] = {}, {}
      for n, a in (("q", q), ("k", k), ("v", v)):
        outs[n], new_state["conv"][n] = self.conv[n].step(a, state["conv"][n])
      q, k, v = outs["q"], outs["k"], outs["v"]
    q, k, v = self._features(q, k, v)
    g, beta = self._gates(x)
    if t == 1 and not prefix:
      o, memory = mem_ops.gated_delta_rule_step(
        q[:, 0],
        k[:, 0],
        v[:, 0],
        g=None if g is None else g[:, 0],
        beta=None if beta is None else beta[:, 0],
        scale=self.scale,
        state=state["memory"],
      )
      o = o[:, None]
    else:
      o, memory = mem_ops.gated_delta_rule(
        q,
        k,
        v,
        g=g,
        beta=beta,
        scale=self.scale,
        initial_state=state["memory"],
        output_final_state=True,
        chunk_size=self.chunk_size,
        prefix_len=t if prefix else None,
        implementation=self.implementation,
      )
    new_state["memory"] = memory
    return self._output(x, o), new_state


def decay_params(
  rngs: nnx.Rngs,
  n_heads: int,
  a_init_range: tuple[float, float] = A_INIT_RANGE,
  dt_init_range: tuple[float, float] = DT_INIT_RANGE,
) -> tuple[nnx.Param, nnx.Param]:
  """Mamba-2's ``A_log`` (``A`` uniform in ``a_init_range``) and ``dt_bias`` (``softplus`` of it
  log-uniform in ``dt_init_range``), both ``[H]``; the defaults are Mamba-2's."""
  a_lo, a_hi = a_init_range
  dt_lo, dt_hi = dt_init_range

  def a_init(key, shape, dtype):
    # A = 0 (allowed at the bottom of the range, as fla's U(0, 16)) would make A_log -inf.
    a = jax.random.uniform(key, shape, dtype, a_lo, a_hi)
    return jnp.log(jnp.maximum(a, jnp.finfo(dtype).tiny))

  def dt_init(key, shape, dtype):
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, np.log(dt_lo), np.log(dt_hi)))
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus

  return (
    param(rngs, a_init, (n_heads,), ("heads",)),
    param(rngs, dt_init, (n_heads,), ("heads",)),
  )


def log_decay(a: jax.Array, a_log: jax.Array, dt_bias: jax.Array) -> jax.Array:
  """``g = -exp(A_log) * softplus(a + dt_bias)`` (<= 0), ``a [..., H]`` float32."""
  return -jnp.exp(a_log) * jax.nn.softplus(a + dt_bias)
