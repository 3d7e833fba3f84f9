"""Titans' long-term memory as a layer: projections, short convolutions, gates, the op, decode.

``x [B,T,D] -> [B,T,D]``. Queries, keys and values are projected per head, passed through a
causal depthwise convolution and a SiLU (Titans Sec. 4.4), queries and keys (and, here, values)
are L2-normalised, and the gates theta (lr), eta (momentum) and alpha (decay) come from the
input (data-dependent forgetting); optionally so do ATLAS's Omega weights gamma (how much each
token counts in the windowed inner loss).

``ops.memory.neural_memory`` trains the per-head memory MLP online and reads it; the memory's
initial weights are parameters (the outer loop learns them). Memory weights, momenta and gates
stay float32 whatever the compute dtype.

Stability of the inner loop. The op takes every gradient of a chunk at the chunk-start weights
``M0``, so a chunk of ``C`` tokens with aligned keys (runs of one repeated byte in real text)
moves the memory by the sum of ``C`` gradients at once, and per-token momentum adds up to
``C (C + 1) / 2`` of them as eta -> 1: with theta = 0.05 and eta = 0.9 a depth-2 memory on
text reached 1e36 within 50 tokens. The learning rate is therefore parameterised so that
``lr_max`` caps the whole chunk's step: ``theta_t = lr_max sigmoid(a_t) / C``; for the momentum
optimiser also divided by the Omega window ``c`` (its loss sums ``c`` terms) and multiplied by
``(1 - eta_t)`` (momentum as an exponential average: each gradient is written with total
weight theta_t instead of ``theta_t / (1 - eta_t)``). With unit-norm keys the l2 inner loss
has curvature 2, so ``lr_max = 0.5`` is at most one full delta-rule write per chunk. Muon's
update ``theta NS(U)`` has a bounded norm whatever the gradient, so only ``1 / C`` applies.

The same ``__call__`` serves the full forward (``state=None``) and decoding (a state from
``init_state``): the op's state carries the chunk grid, so any split of a sequence into calls
gives the same outputs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import ops.memory.neural as nm
from ops.memory.neural import apply_feature_map, mlp_apply
from zoo.layers.params import fan_in, param


def _conv_init(key, shape, dtype):
  """A near-identity causal filter: the current token's tap is 1, earlier taps are small."""
  w = 0.02 * jax.random.normal(key, shape, dtype)
  return w.at[-1].add(1.0)


def causal_conv(x: jax.Array, w: jax.Array, history: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Depthwise causal convolution with a carried history.

  Args:
    x: [B,T,...] inputs.
    w: [W,...] per-channel taps, the last tap on the current token.
    history: [B,W-1,...] the W-1 inputs before ``x`` (zeros at the sequence start).

  Returns:
    ``(y [B,T,...], new_history [B,W-1,...])``.
  """
  width, length = w.shape[0], x.shape[1]
  full = jnp.concatenate([history.astype(x.dtype), x], axis=1)
  y = sum(w[i].astype(x.dtype) * full[:, i : i + length] for i in range(width))
  return y, full[:, full.shape[1] - (width - 1) :]


def _l2norm(x: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + 1e-6)


class NeuralMemory(nnx.Module):
  """Gated, momentum-trained neural long-term memory (Titans; ATLAS options).

  Args:
    d_model: D.
    n_heads: H.
    head_dim: K = V per head.
    hidden: Dh of a depth-2 memory MLP; None for a depth-1 (matrix) memory.
    chunk_size: tokens per chunk of the op (gradients at chunk-start weights).
    conv_size: short-convolution width (0 = none).
    lr_max: cap of the summed inner step of one chunk: theta = lr_max * sigmoid(.) /
      (chunk_size * omega_window), times (1 - eta) for the momentum optimiser (see the
      module docstring).
    omega_window, feature_map, objective, optimizer, ns_steps, activation:
      ``ops.memory.neural_memory`` options (ATLAS).
    learn_omega_weights: gamma_t = sigmoid(x_t W_gamma + b_gamma) per head, the op's
      ``omega_weights`` (ATLAS's input-dependent Omega weights); False keeps gamma = 1.
    implementation: the op implementation (None = by backend).
    adaptive_kv: generate the keys and values with a second (depth-1) neural memory trained in
      context (Hope's self-modifying Titans: the projections themselves learn at test time).
      It reads the static key; its inner loss maps that key to the static ``[k, v]``, or, with
      ``kv_self_targets``, to its own read of the static value.
    kv_self_targets: with ``adaptive_kv``, the key/value generator generates its own targets
      (Nested Learning's ``v_hat_t = M_{t-1}(v_t)``; the op's ``self_targets``, read at the
      chunk-start weights) instead of regressing onto the static projections.
  """

  def __init__(
    self,
    d_model: int,
    n_heads: int,
    head_dim: int,
    *,
    hidden: int | None = None,
    chunk_size: int = 16,
    conv_size: int = 4,
    lr_max: float = 0.5,
    omega_window: int = 1,
    feature_map: str = "identity",
    objective: str = "l2",
    optimizer: str = "momentum",
    ns_steps: int = 5,
    activation: str = "silu",
    learn_omega_weights: bool = False,
    implementation: str | None = None,
    adaptive_kv: bool = False,
    kv_self_targets: bool = False,
    rngs: nnx.Rngs,
  ):
    if kv_self_targets and not adaptive_kv:
      raise ValueError("kv_self_targets=True needs adaptive_kv=True (it trains the kv generator)")
    self.n_heads, self.head_dim = n_heads, head_dim
    self.conv_size, self.lr_max = conv_size, lr_max
    self.op_kw = dict(
      chunk_size=chunk_size,
      omega_window=omega_window,
      feature_map=feature_map,
      objective=objective,
      optimizer=optimizer,
      ns_steps=ns_steps,
      activation=activation,
    )
    self.implementation = implementation
    self.adaptive_kv, self.kv_self_targets = adaptive_kv, kv_self_targets
    axes = ("embed", "heads", "head_dim")
    shape = (d_model, n_heads, head_dim)
    self.wq = param(rngs, fan_in([d_model]), shape, axes)
    self.wk = param(rngs, fan_in([d_model]), shape, axes)
    self.wv = param(rngs, fan_in([d_model]), shape, axes)
    if conv_size:
      self.conv = param(
        rngs, _conv_init, (conv_size, 3, n_heads, head_dim), (None, None, *axes[1:])
      )
    self.w_gates = param(rngs, fan_in([d_model]), (d_model, 3, n_heads), ("embed", None, "heads"))
    # Initial gates: sigmoid 1/2 for theta and eta, alpha ~ 0.02 (mostly remember).
    bias = jnp.broadcast_to(jnp.array([0.0, 0.0, -4.0])[:, None], (3, n_heads))
    self.b_gates = param(rngs, lambda *_: bias, (3, n_heads), (None, "heads"))
    self.learn_omega_weights = learn_omega_weights
    if learn_omega_weights:
      # Separate parameters (not a fourth row of w_gates) so models without the option keep
      # their parameter shapes. Bias 2 starts gamma near the fixed rule (sigmoid(2) = 0.88)
      # while the sigmoid still has slope to learn from.
      self.w_omega = param(rngs, fan_in([d_model]), (d_model, n_heads), ("embed", "heads"))
      self.b_omega = param(rngs, lambda *_: jnp.full((n_heads,), 2.0), (n_heads,), ("heads",))
    fdim = nm.feature_dim(head_dim, feature_map)
    dims = [fdim, head_dim] if hidden is None else [fdim, hidden, head_dim]
    names = ("w",) if hidden is None else ("w1", "w2")
    self.memory = nnx.Dict(
      {
        name: param(rngs, fan_in([d_in]), (n_heads, d_in, d_out), ("heads", None, "state"))
        for name, d_in, d_out in zip(names, dims[:-1], dims[1:])
      }
    )
    if adaptive_kv:
      # Starts as [I, I]: the generated key and value equal the static ones until it learns.
      eye = jnp.tile(jnp.eye(head_dim)[None], (n_heads, 1, 2))
      self.kv_memory = param(
        rngs, lambda *_: eye, (n_heads, head_dim, 2 * head_dim), ("heads", None, "state")
      )
    self.out_scale = param(
      rngs, jax.nn.initializers.ones, (n_heads, head_dim), ("heads", "head_dim")
    )
    self.wo = param(
      rngs,
      fan_in([n_heads, head_dim]),
      (n_heads, head_dim, d_model),
      ("heads", "head_dim", "embed"),
    )

  def initial_weights(self) -> dict[str, jax.Array]:
    """The learned initial memory ``{"w": [H,F,V]}`` or ``{"w1", "w2"}`` float32."""
    return {name: w[...] for name, w in self.memory.items()}

  def init_state(self, batch: int) -> dict[str, Any]:
    """Decode state at the sequence start: conv history and the op's state dict."""
    weights = {n: jnp.broadcast_to(w, (batch, *w.shape)) for n, w in self.initial_weights().items()}
    h, k = self.n_heads, self.head_dim
    fdim = nm.feature_dim(k, self.op_kw["feature_map"])
    c = self.op_kw["omega_window"]
    memory = {
      "weights": weights,
      "momentum": jax.tree.map(jnp.zeros_like, weights),
      "chunk_start": weights,
      "position": jnp.zeros((), jnp.int32),
      "window_k": jnp.zeros((batch, h, c - 1, fdim), jnp.float32),
      "window_v": jnp.zeros((batch, h, c - 1, k), jnp.float32),
      "window_gamma": jnp.zeros((batch, h, c - 1), jnp.float32),
    }
    conv = jnp.zeros((batch, max(self.conv_size - 1, 0), 3, h, k), jnp.float32)
    state = {"conv": conv, "memory": memory}
    if self.adaptive_kv:
      w = {"w": jnp.broadcast_to(self.kv_memory[...], (batch, *self.kv_memory.shape))}
      state["kv_memory"] = {
        "weights": w,
        "momentum": jax.tree.map(jnp.zeros_like, w),
        "chunk_start": w,
        "position": jnp.zeros((), jnp.int32),
        "window_k": jnp.zeros((batch, h, 0, k), jnp.float32),
        # With self targets the op's window holds target inputs (width K), else targets (2K).
        "window_v": jnp.zeros((batch, h, 0, k if self.kv_self_targets else 2 * k), jnp.float32),
        "window_gamma": jnp.zeros((batch, h, 0), jnp.float32),
      }
    return state

  def project(self, x: jax.Array, conv_history: jax.Array | None):
    """q, k, v [B,T,H,K] (L2-normalised), gates [B,T,H] x3, new conv history."""
    dt = x.dtype
    qkv = jnp.stack(
      [jnp.einsum("btd,dhk->bthk", x, w[...].astype(dt)) for w in (self.wq, self.wk, self.wv)],
      axis=2,
    )  # [B,T,3,H,K]
    if self.conv_size:
      if conv_history is None:
        conv_history = jnp.zeros((x.shape[0], self.conv_size - 1, *qkv.shape[2:]), dt)
      qkv, conv_history = causal_conv(qkv, self.conv[...], conv_history)
    qkv = jax.nn.silu(qkv)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    pre = jnp.einsum("btd,dgh->btgh", x.astype(jnp.float32), self.w_gates[...]) + self.b_gates[...]
    gates = jax.nn.sigmoid(pre)
    eta = gates[:, :, 1]
    lr = self.lr_max * gates[:, :, 0] / self.op_kw["chunk_size"]
    if self.op_kw["optimizer"] == "momentum":
      lr = lr * (1.0 - eta) / self.op_kw["omega_window"]
    # Unit-norm values as well as keys: a depth-2 memory trained on raw-scale targets diverges
    # for inner steps above ~0.05 (its curvature grows with its weights).
    return _l2norm(q), _l2norm(k), _l2norm(v), lr, eta, gates[:, :, 2], conv_history

  def omega_weights(self, x: jax.Array) -> jax.Array | None:
    """ATLAS's Omega weights ``gamma [B,T,H]`` in [0, 1] float32, or None (gamma = 1).

    Pointwise in time (no convolution), so decoding one token needs no history.
    """
    if not self.learn_omega_weights:
      return None
    pre = jnp.einsum("btd,dh->bth", x.astype(jnp.float32), self.w_omega[...])
    return jax.nn.sigmoid(pre + self.b_omega[...])

  def output(self, y: jax.Array, dtype) -> jax.Array:
    """Per-head RMS norm of the memory read ``y [B,T,H,V]``, then the output projection."""
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6) * self.out_scale[...]
    return jnp.einsum("bthk,hkd->btd", y.astype(dtype), self.wo[...].astype(dtype))

  def __call__(
    self, x: jax.Array, state: dict[str, Any] | None = None
  ) -> tuple[jax.Array, dict[str, Any]]:
    """Reads and trains the memory over ``x [B,T,D]``.

    Args:
      x: [B,T,D] inputs.
      state: None at the sequence start (the learned initial memory), else the state returned
        by ``init_state`` or a previous call.

    Returns:
      ``(out [B,T,D], new_state)``.
    """
    q, k, v, lr, eta, alpha, conv = self.project(x, None if state is None else state["conv"])
    new_state = {}
    if self.adaptive_kv:
      kv_init = {"w": self.kv_memory[...]} if state is None else state["kv_memory"]
      # Self targets: the generator's target is its own read of the static value, M0(v)
      # (Nested Learning); otherwise it regresses onto the static projections [k, v].
      target = v if self.kv_self_targets else jnp.concatenate([k, v], axis=-1)
      kv, new_state["kv_memory"] = self._memory_call(
        k,
        k,
        target,
        lr,
        eta,
        alpha,
        kv_init,
        state is not None,
        chunk_size=self.op_kw["chunk_size"],
        self_targets=self.kv_self_targets,
      )
      k, v = _l2norm(kv[..., : self.head_dim]), _l2norm(kv[..., self.head_dim :])
    memory = self.initial_weights() if state is None else state["memory"]
    y, new_state["memory"] = self._memory_call(
      q,
      k,
      v,
      lr,
      eta,
      alpha,
      memory,
      state is not None,
      gamma=self.omega_weights(x),
      **self.op_kw,
    )
    if conv is None:
      conv = jnp.zeros((x.shape[0], 0, 3, self.n_heads, self.head_dim), jnp.float32)
    new_state["conv"] = conv.astype(jnp.float32)
    return self.output(y, x.dtype), new_state

  def _memory_call(self, q, k, v, lr, eta, alpha, memory, decoding, gamma=None, **op_kw):
    """The op over ``[B,T,H,.]`` inputs (``gamma [B,T,H]`` or None: the Omega weights); a
    single decoded token takes the step function."""
    if q.shape[1] == 1 and decoding:
      # Decoding one token: the step function is constant-cost in the context length.
      y, memory = nm.neural_memory_step(
        q[:, 0],
        k[:, 0],
        v[:, 0],
        lr=lr[:, 0],
        momentum=eta[:, 0],
        decay=alpha[:, 0],
        memory=memory,
        omega_weights=None if gamma is None else gamma[:, 0],
        **op_kw,
      )
      return y[:, None], memory
    return nm.neural_memory(
      q,
      k,
      v,
      lr=lr,
      momentum=eta,
      decay=alpha,
      memory=memory,
      omega_weights=gamma,
      implementation=self.implementation,
      **op_kw,
    )

  def retrieve(self, x: jax.Array, weights: dict[str, jax.Array]) -> jax.Array:
    """Reads fixed memory weights without training them (MAC's retrieval ``M*(q)``).

    Args:
      x: [B,T,D] inputs (the query path skips the short convolution: the retrieval is
        pointwise in time).
      weights: ``[B,H,...]`` memory weights, e.g. ``state["memory"]["weights"]``.

    Returns:
      [B,T,D].
    """
    q = _l2norm(jax.nn.silu(jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(x.dtype))))
    q = apply_feature_map(q, self.op_kw["feature_map"])
    per_token = jax.tree.map(lambda w: w[:, None], weights)  # [B,1,H,...] broadcast over T
    y = mlp_apply(per_token, q, self.op_kw["activation"], False)
    return self.output(y, x.dtype)


def memory_hidden(head_dim: int, depth: int, expansion: int) -> int | None:
  """Dh of the memory MLP: None for depth 1, ``expansion * head_dim`` for depth 2."""
  if depth == 1:
    return None
  return int(math.ceil(expansion * head_dim))
