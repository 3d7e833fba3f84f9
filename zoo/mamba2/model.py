"""Mamba-2 blocks; the SSD recurrence is the scalar-decay additive case of the memory op.

``h_t = exp(dt_t A) h_{t-1} + B_t (dt_t x_t)^T`` and ``y_t = h_t^T C_t`` is
``gated_delta_rule(q=C, k=B, v=dt*x, g=dt*A, scale=1)`` with B and C shared by the heads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import ops.memory as mem_ops
from zoo.layers import parallel
from zoo.layers.conv import ShortConv
from zoo.layers.linear_attention import decay_params
from zoo.layers.norms import RMSNorm
from zoo.layers.params import fan_in, param
from zoo.layers.recurrent_lm import AttentionMixer, RecurrentLM
from zoo.mamba2.config import Mamba2Config


class Mamba2Mixer(nnx.Module):
  """The Mamba-2 mixer ``x [B,T,D] -> [B,T,D]`` (ngroups = 1)."""

  def __init__(self, c: Mamba2Config, *, rngs: nnx.Rngs):
    D, H, P, N = c.d_model, c.n_heads, c.head_dim, c.d_state
    self.n_heads, self.head_dim, self.d_state = H, P, N
    self.chunk_size, self.implementation = c.chunk_size, c.memory_impl
    init = fan_in([D])
    self.w_x = param(rngs, init, (D, H, P), ("embed", "heads", "head_dim"))
    self.w_z = param(rngs, init, (D, H, P), ("embed", "heads", "head_dim"))
    self.w_b = param(rngs, init, (D, N), ("embed", "state"))
    self.w_c = param(rngs, init, (D, N), ("embed", "state"))
    self.w_dt = param(rngs, init, (D, H), ("embed", "heads"))
    self.a_log, self.dt_bias = decay_params(rngs, H, c.a_init_range, c.dt_init_range)
    self.d_skip = param(rngs, jax.nn.initializers.ones, (H,), ("heads",))
    width = c.conv_width
    self.conv = (
      nnx.Dict(
        {
          "x": ShortConv((H, P), ("heads", "head_dim"), width, rngs=rngs),
          "b": ShortConv((N,), ("state",), width, rngs=rngs),
          "c": ShortConv((N,), ("state",), width, rngs=rngs),
        }
      )
      if width
      else None
    )
    self.norm = RMSNorm(H * P, eps=c.norm_eps, axis_name="mlp", rngs=rngs)
    self.w_out = param(rngs, fan_in([H, P]), (H, P, D), ("heads", "head_dim", "embed"))

  def state_size(self) -> int:
    return self.n_heads * self.d_state * self.head_dim

  def _project(self, x):
    dt = x.dtype
    xs = jnp.einsum("btd,dhp->bthp", x, self.w_x[...].astype(dt))
    b = x @ self.w_b[...].astype(dt)
    c = x @ self.w_c[...].astype(dt)
    return {"x": xs, "b": b, "c": c}

  def _ssd_inputs(self, x, u):
    """(q, k, v, g) of the memory op from the convolved ``u`` and the block input ``x``."""
    H = self.n_heads
    delta = jax.nn.softplus(x.astype(jnp.float32) @ self.w_dt[...] + self.dt_bias[...])  # [B,T,H]
    g = -jnp.exp(self.a_log[...]) * delta  # = log_decay(x W_dt, A_log, dt_bias)
    bcast = lambda a: jnp.broadcast_to(a[:, :, None, :], a.shape[:2] + (H, a.shape[-1]))
    v = (u["x"].astype(jnp.float32) * delta[..., None]).astype(x.dtype)
    return bcast(u["c"]), bcast(u["b"]), v, g

  def _output(self, x, u, y):
    y = y + self.d_skip[...][:, None].astype(y.dtype) * u["x"]
    z = jnp.einsum("btd,dhp->bthp", x, self.w_z[...].astype(x.dtype))
    b, t, h, p = y.shape
    y = self.norm((y * jax.nn.silu(z)).reshape(b, t, h * p)).reshape(b, t, h, p)
    return jnp.einsum("bthp,hpd->btd", y, self.w_out[...].astype(x.dtype))

  def __call__(self, x, *, segment_ids=None, prefix_len=None, **_):
    if prefix_len:
      raise ValueError("Mamba-2 has no prefix (JRT) mode")
    u = self._project(x)
    if self.conv is not None:
      u = {n: self.conv[n](a, segment_ids) for n, a in u.items()}
    q, k, v, g = self._ssd_inputs(x, u)
    y, state = parallel.gated_delta_rule(
      q,
      k,
      v,
      g=g,
      scale=1.0,
      output_final_state=True,
      chunk_size=self.chunk_size,
      segment_ids=segment_ids,
      implementation=self.implementation,
    )
    return self._output(x, u, y), {"state": state}

  def init_state(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict[str, Any]:
    del max_len  # constant-size state
    shape = (batch, self.n_heads, self.d_state, self.head_dim)
    state: dict[str, Any] = {"memory": jnp.zeros(shape, jnp.float32)}
    if self.conv is not None:
      state["conv"] = {n: c.init_state(batch, dtype) for n, c in self.conv.items()}
    return state

  def step(self, x, state, *, prefix=False, **_):
    if prefix:
      raise ValueError("Mamba-2 has no prefix (JRT) mode")
    u = self._project(x)
    new: dict[str, Any] = {}
    if self.conv is not None:
      new["conv"] = {}
      for n in u:
        u[n], new["conv"][n] = self.conv[n].step(u[n], state["conv"][n])
    q, k, v, g = self._ssd_inputs(x, u)
    if x.shape[1] == 1:
      y, memory = mem_ops.gated_delta_rule_step(
        q[:, 0], k[:, 0], v[:, 0], g=g[:, 0], scale=1.0, state=state["memory"]
      )
      y = y[:, None]
    else:
      y, memory = mem_ops.gated_delta_rule(
        q,
        k,
        v,
        g=g,
        scale=1.0,
        initial_state=state["memory"],
        output_final_state=True,
        chunk_size=self.chunk_size,
        implementation=self.implementation,
      )
    new["memory"] = memory
    return self._output(x, u, y), new


class Mamba2(RecurrentLM):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``."""

  def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
    c = config
    mixers = []
    for i in range(c.n_layers):
      if i in c.attention_layers:
        mixers.append(
          AttentionMixer(
            c.d_model,
            c.attention_heads,
            c.d_model // c.attention_heads,
            window=c.window,
            implementation=c.attention_impl,
            rngs=rngs,
          )
        )
      else:
        mixers.append(Mamba2Mixer(c, rngs=rngs))
    super().__init__(c, mixers, rngs=rngs)
