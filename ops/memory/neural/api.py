"""Public entry points of Titans' neural memory (with ATLAS's options).

The memory ``M`` is a small per-head MLP whose weights are the recurrent state, trained online
on ``||M(phi(k)) - v||^2`` (or the Hebbian ``-<M(phi(k)), v>``) with data-dependent
lr / momentum / decay; the math is in ``reference.py`` and the README beside this file.

``memory`` (the initial state) is one of:

- weights shared across the batch: ``{"w": [H,F,V]}`` (depth 1) or
  ``{"w1": [H,F,Dh], "w2": [H,Dh,V]}`` (depth 2);
- the same with a leading batch axis (``[B,H,...]``), e.g. per-sequence weights;
- a state dict returned by ``neural_memory`` / ``neural_memory_step`` (continue a sequence):
  ``weights``, ``momentum`` and ``chunk_start`` (the weights the current chunk's gradients are
  taken at) as ``[B,H,...]`` dicts, ``position`` (int32 scalar, tokens seen so far, which fixes
  the chunk grid), and the last ``omega_window - 1`` tokens ``window_k [B,H,c-1,F]``,
  ``window_v [B,H,c-1,V]``, ``window_gamma [B,H,c-1]``.

``F = feature_dim(K, feature_map)`` is the key width after the feature map. With
``self_targets=True`` the ``v`` argument is not the target but the memory's input for it
(``[...,K]`` like the keys, read through the same feature map): the target of token ``s`` is
``M0(phi(v_s))`` (Nested Learning's self-generated values), ``V`` is then the memory's output
width, and ``window_v`` holds ``phi(v)`` (``[B,H,c-1,F]``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ops.common.dispatch import dispatch, implementations
from ops.memory.neural import common, reference
from ops.memory.neural.common import feature_dim

# Each module exposes ``neural_memory(q, k, v, theta, eta, alpha, gamma, state, *, chunk_size,
# offset, window, objective, optimizer, ns_steps, activation, residual, self_targets,
# interpret) -> (y, final_state)`` on feature-mapped float32 inputs.
IMPLEMENTATIONS = implementations(
  "ops.memory.neural", "neural_memory", ("reference", "xla", "pallas_tpu", "pallas_gpu")
)
# The kernels cover the Titans configuration; xla serves the rest (Muon, windows, "dot", ...).
DEFAULTS = {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}
_STATE_KEYS = (
  "weights",
  "momentum",
  "chunk_start",
  "position",
  "window_k",
  "window_v",
  "window_gamma",
)


def init_memory(
  key: jax.Array,
  *,
  heads: int,
  key_dim: int,
  value_dim: int,
  hidden: int | None = None,
  feature_map: str = "identity",
  scale: float = 1.0,
) -> dict[str, jax.Array]:
  """Random initial memory weights (shared across the batch).

  Args:
    key: PRNG key.
    heads, key_dim, value_dim: H, K (before the feature map), V.
    hidden: Dh for a depth-2 memory; None gives a depth-1 (matrix) memory.
    feature_map: the feature map the memory will read keys through (sets F).
    scale: multiplies the fan-in scaled normal initialisation.

  Returns:
    ``{"w": [H,F,V]}`` or ``{"w1": [H,F,Dh], "w2": [H,Dh,V]}`` float32.
  """
  if feature_map not in common.FEATURE_MAPS:
    raise ValueError(f"unknown feature_map {feature_map!r}; choose from {common.FEATURE_MAPS}")
  fdim = feature_dim(key_dim, feature_map)
  dims = [fdim, value_dim] if hidden is None else [fdim, hidden, value_dim]
  names = common.DEPTH_KEYS[len(dims) - 1]
  keys = jax.random.split(key, len(names))
  return {
    name: scale * jax.random.normal(kk, (heads, d_in, d_out), jnp.float32) / math.sqrt(d_in)
    for name, kk, d_in, d_out in zip(names, keys, dims[:-1], dims[1:])
  }


def _weight_shapes(depth, heads, fdim, vdim, hidden):
  if depth == 1:
    return {"w": (heads, fdim, vdim)}
  return {"w1": (heads, fdim, hidden), "w2": (heads, hidden, vdim)}


def _check_weights(weights, what, batch, heads, fdim, vdim, allow_shared):
  depth = common.memory_depth(weights)
  hidden = weights["w1"].shape[-1] if depth == 2 else None
  for name, shape in _weight_shapes(depth, heads, fdim, vdim, hidden).items():
    got = tuple(weights[name].shape)
    if got != (batch, *shape) and not (allow_shared and got == shape):
      want = f"{shape} or {(batch, *shape)}" if allow_shared else f"{(batch, *shape)}"
      raise ValueError(f"{what}[{name!r}] has shape {got}, expected {want} (F={fdim}, V={vdim})")
  return depth


def _output_dim(memory) -> int:
  """V, the memory's output width, read off its last weight matrix (for ``self_targets``)."""
  if not isinstance(memory, dict):
    raise ValueError(f"memory must be a dict of weights or a state dict, got {type(memory)}")
  weights = memory.get("weights", memory)
  if not isinstance(weights, dict):
    raise ValueError(f"memory['weights'] must be a dict of weights, got {type(weights)}")
  last = common.DEPTH_KEYS[common.memory_depth(weights)][-1]
  return int(weights[last].shape[-1])


def _as_state(memory, batch, heads, fdim, vdim, window, target_dim):
  """Normalises ``memory`` to a float32 state dict with ``[B,H,...]`` leaves.

  ``target_dim`` is the width of what the window stores per token: ``V`` (targets) or, with
  ``self_targets``, ``F`` (the targets' inputs).
  """
  if not isinstance(memory, dict):
    raise ValueError(f"memory must be a dict of weights or a state dict, got {type(memory)}")
  if "weights" in memory:
    missing = set(_STATE_KEYS) - set(memory)
    if missing:
      raise ValueError(f"memory state is missing {sorted(missing)}")
    depth = _check_weights(memory["weights"], "memory['weights']", batch, heads, fdim, vdim, False)
    for name in ("momentum", "chunk_start"):
      if common.memory_depth(memory[name]) != depth:
        raise ValueError(f"memory[{name!r}] and memory['weights'] have different depths")
      _check_weights(memory[name], f"memory[{name!r}]", batch, heads, fdim, vdim, False)
      for key in memory[name]:
        if memory[name][key].shape != memory["weights"][key].shape:
          raise ValueError(f"memory[{name!r}][{key!r}] does not match memory['weights']")
    expected = {
      "window_k": (batch, heads, window - 1, fdim),
      "window_v": (batch, heads, window - 1, target_dim),
      "window_gamma": (batch, heads, window - 1),
      "position": (),
    }
    for name, shape in expected.items():
      if tuple(jnp.shape(memory[name])) != shape:
        raise ValueError(
          f"memory[{name!r}] has shape {tuple(jnp.shape(memory[name]))}, expected {shape} "
          f"(omega_window={window})"
        )
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    state = {name: jax.tree.map(f32, memory[name]) for name in _STATE_KEYS if name != "position"}
    state["position"] = jnp.asarray(memory["position"], jnp.int32)
    return state
  _check_weights(memory, "memory", batch, heads, fdim, vdim, True)
  weights = {
    name: jnp.broadcast_to(jnp.asarray(w, jnp.float32), (batch, *w.shape[-3:]))
    for name, w in memory.items()
  }
  return {
    "weights": weights,
    "momentum": jax.tree.map(jnp.zeros_like, weights),
    "chunk_start": weights,
    "position": jnp.zeros((), jnp.int32),
    "window_k": jnp.zeros((batch, heads, window - 1, fdim), jnp.float32),
    "window_v": jnp.zeros((batch, heads, window - 1, target_dim), jnp.float32),
    "window_gamma": jnp.zeros((batch, heads, window - 1), jnp.float32),
  }


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_config(
  chunk_size, omega_window, feature_map, objective, optimizer, ns_steps, activation
):
  if not isinstance(chunk_size, int) or chunk_size < 1 or chunk_size & (chunk_size - 1):
    raise ValueError(f"chunk_size must be a power of two, got {chunk_size!r}")
  if not isinstance(omega_window, int) or omega_window < 1:
    raise ValueError(f"omega_window must be an int >= 1, got {omega_window!r}")
  if feature_map not in common.FEATURE_MAPS:
    raise ValueError(f"unknown feature_map {feature_map!r}; choose from {common.FEATURE_MAPS}")
  if objective not in common.OBJECTIVES:
    raise ValueError(
      f"unknown objective {objective!r}; choose from {common.OBJECTIVES} "
      "(l2: ||M(phi(k)) - v||^2, dot: -<M(phi(k)), v>)"
    )
  if optimizer not in common.OPTIMIZERS:
    raise ValueError(f"unknown optimizer {optimizer!r}; choose from {common.OPTIMIZERS}")
  if not isinstance(ns_steps, int) or ns_steps < 0:
    raise ValueError(f"ns_steps must be an int >= 0, got {ns_steps!r}")
  if activation not in common.ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; choose from {sorted(common.ACTIVATIONS)}")


def _check_gates(gates, shape):
  for name, gate in gates.items():
    if gate is None:
      continue
    if tuple(gate.shape) != shape:
      raise ValueError(f"{name} has shape {tuple(gate.shape)}, expected {shape}")
    if _is_concrete(gate):
      values = np.asarray(gate, np.float32)
      lo, hi = (0.0, 1.0) if name != "omega_weights" else (0.0, np.inf)
      if not np.all((values >= lo) & (values <= hi)):
        raise ValueError(
          f"{name} must lie in [{lo}, {hi}], got values in [{values.min()}, {values.max()}]"
        )


def _prepare(q, k, v, gates, memory, *, time_axis, config):
  """Validates everything and returns float32 features, gates and the state."""
  _check_config(
    **{
      n: config[n]
      for n in (
        "chunk_size",
        "omega_window",
        "feature_map",
        "objective",
        "optimizer",
        "ns_steps",
        "activation",
      )
    }
  )
  if q.ndim != 3 + time_axis or k.shape != q.shape:
    raise ValueError(
      f"q and k must both be [B,{'T,' if time_axis else ''}H,K], got {q.shape} and {k.shape}"
    )
  self_targets = config["self_targets"]
  if not isinstance(self_targets, bool):
    raise ValueError(f"self_targets must be a bool, got {self_targets!r}")
  if self_targets and v.shape != k.shape:
    # The target is the memory's own read M0(phi(v)), so v is a memory input like the keys.
    raise ValueError(
      f"with self_targets=True, v is the memory's input for its target and must have the "
      f"keys' shape {k.shape} (width K, read through feature_map), got {v.shape}"
    )
  if v.ndim != q.ndim or v.shape[:-1] != q.shape[:-1]:
    raise ValueError(f"v must be {q.shape[:-1]} + (V,), got {v.shape}")
  if time_axis and q.shape[1] < 1:
    raise ValueError(f"the sequence is empty (T={q.shape[1]})")
  _check_gates(gates, q.shape[:-1])
  batch, heads = q.shape[0], q.shape[-2]
  fdim = feature_dim(q.shape[-1], config["feature_map"])
  vdim = _output_dim(memory) if self_targets else v.shape[-1]
  if config["residual"] and fdim != vdim:
    raise ValueError(f"residual=True needs F == V, got F={fdim}, V={vdim}")
  target_dim = fdim if self_targets else vdim
  state = _as_state(memory, batch, heads, fdim, vdim, config["omega_window"], target_dim)
  fmap = config["feature_map"]
  f32 = lambda x: x.astype(jnp.float32)
  gamma = gates["omega_weights"]
  gamma = jnp.ones(q.shape[:-1], jnp.float32) if gamma is None else f32(gamma)
  inputs = (
    common.apply_feature_map(q, fmap),
    common.apply_feature_map(k, fmap),
    common.apply_feature_map(v, fmap) if self_targets else f32(v),
    f32(gates["lr"]),
    f32(gates["momentum"]),
    f32(gates["decay"]),
    gamma,
  )
  return inputs, state


def neural_memory(
  q: Float[Array, "B T H K"],
  k: Float[Array, "B T H K"],
  v: Float[Array, "B T H V"],
  *,
  lr: Float[Array, "B T H"],
  momentum: Float[Array, "B T H"],
  decay: Float[Array, "B T H"],
  memory: dict,
  chunk_size: int = 16,
  omega_window: int = 1,
  omega_weights: Float[Array, "B T H"] | None = None,
  feature_map: str = "identity",
  objective: str = "l2",
  optimizer: str = "momentum",
  ns_steps: int = 5,
  activation: str = "silu",
  residual: bool = False,
  self_targets: bool = False,
  implementation: str | tuple[str, ...] | None = None,
  interpret: bool | None = None,
) -> tuple[Float[Array, "B T H V"], dict]:
  """Titans' long-term memory over a sequence (ATLAS options included).

  Args:
    q, k: [B,T,H,K] queries and keys (read through ``feature_map`` inside the op).
    v: [B,T,H,V] values (with ``self_targets``: [B,T,H,K], the input the memory reads its
      targets from).
    lr, momentum, decay: [B,T,H] gates theta, eta, alpha in [0, 1].
    memory: initial weights or a state dict (see the module docstring).
    chunk_size: C, a power of two; gradients are taken at the chunk-start weights
      (1 = fully sequential Titans).
    omega_window: c, tokens in the inner loss (ATLAS's Omega rule; 1 = Titans).
    omega_weights: [B,T,H] per-token weights gamma >= 0 in the Omega loss (default 1).
    feature_map: "identity", "poly2", "poly3", "poly4" (the degree-P Taylor features of
      ``exp(x.y)``) or "elu1".
    objective: the inner loss per token, "l2" (``||M(phi(k)) - v||^2``, Titans / ATLAS) or
      "dot" (``-<M(phi(k)), v>``, the Hebbian rule of ATLAS's DeepTransformers; depth 1 with
      theta = 1 and no momentum / decay is unnormalised linear attention).
    optimizer: "momentum" (Titans) or "muon" (ATLAS: Newton-Schulz-orthogonalised momentum,
      ``M_t = (1 - alpha_t) M_{t-1} + theta_t NS(U_t)``, ``U_t = eta_t U_{t-1} - grad``).
    ns_steps: Newton-Schulz iterations for "muon".
    activation: the depth-2 memory's nonlinearity ("silu", "gelu", "relu", "tanh").
    residual: read ``x + M(x)`` (needs F == V).
    self_targets: the memory generates its own targets (Nested Learning's self-modifying
      memories, ``v_hat_s = M0(phi(v_s))``): ``v`` is then ``[B,T,H,K]``, the memory's input
      for the target, and ``V`` the memory's output width. The target is read at the same
      chunk-start weights ``M0`` as the gradient (``M_{t-1}`` at chunk_size 1; window tokens
      of an earlier chunk included) and is a constant of the inner gradient; the outer
      gradient flows through it into ``M0`` and ``v``.
    implementation: "reference", "xla", "pallas_tpu", "pallas_gpu" (a name never falls
      back), a sequence of them (tried in order), or None (by backend, ``DEFAULTS``: the
      platform's kernel then xla, each refusal logged). The Pallas kernels cover the Titans
      configuration (l2 objective, momentum optimiser, omega_window=1, chunk_size >= 8, a
      static position, no self_targets) and raise ``NotSupportedError`` otherwise.
    interpret: run Pallas kernels in interpret mode (None: only when lowering for CPU).

  Returns:
    ``(y [B,T,H,V] in v's dtype, state)``; the state dict continues the sequence when passed
    back as ``memory`` (same chunk_size, omega_window and self_targets) or to
    ``neural_memory_step``.

  Raises:
    ValueError: bad shapes (with self_targets: v not shaped like k), gates outside [0, 1]
      (when concrete), chunk_size not a power of two, an empty sequence, an unknown option.
  """
  config = dict(
    chunk_size=chunk_size,
    omega_window=omega_window,
    feature_map=feature_map,
    objective=objective,
    optimizer=optimizer,
    ns_steps=ns_steps,
    activation=activation,
    residual=residual,
    self_targets=self_targets,
  )
  gates = {"lr": lr, "momentum": momentum, "decay": decay, "omega_weights": omega_weights}
  inputs, state = _prepare(q, k, v, gates, memory, time_axis=True, config=config)
  # The chunk grid's offset is static unless a state with a traced position is continued.
  position = memory.get("position", 0)
  offset = int(position) % chunk_size if _is_concrete(position) else None
  y, final = dispatch(
    "neural_memory",
    IMPLEMENTATIONS,
    implementation,
    DEFAULTS,
    *inputs,
    state,
    chunk_size=chunk_size,
    offset=offset,
    window=omega_window,
    objective=objective,
    optimizer=optimizer,
    ns_steps=ns_steps,
    activation=activation,
    residual=residual,
    self_targets=self_targets,
    interpret=interpret,
    flops=forward_flops,
  )
  return y.astype(v.dtype), final


def forward_flops(q, k, v, theta, eta, alpha, gamma, state, *, chunk_size, window, **_) -> float:
  """Matmul FLOPs of the chunked forward, per token and weight matrix ``[m, n]``.

  The gradient at ``M0`` (a forward and a backward product, ``4 m n``), the read through
  ``M`` and ``U`` (``4 m n``) and the chunk's correction terms (``2 C (m + n)``), the window's
  tokens each adding the gradient's ``4 m n``.
  """
  b, t, h, _ = q.shape
  per_token = 0
  for w in state["weights"].values():
    m, n = w.shape[-2:]
    per_token += 4 * m * n * window + 4 * m * n + 2 * chunk_size * (m + n)
  return float(b * t * h * per_token)


def neural_memory_step(
  q: Float[Array, "B H K"],
  k: Float[Array, "B H K"],
  v: Float[Array, "B H V"],
  *,
  lr: Float[Array, "B H"],
  momentum: Float[Array, "B H"],
  decay: Float[Array, "B H"],
  memory: dict,
  chunk_size: int = 16,
  omega_window: int = 1,
  omega_weights: Float[Array, "B H"] | None = None,
  feature_map: str = "identity",
  objective: str = "l2",
  optimizer: str = "momentum",
  ns_steps: int = 5,
  activation: str = "silu",
  residual: bool = False,
  self_targets: bool = False,
) -> tuple[Float[Array, "B H V"], dict]:
  """One decoding step: equals ``neural_memory`` on the next token.

  Args: as ``neural_memory`` without the time axis; ``memory`` is weights (the first token)
    or the state returned by a previous call of either function.

  Returns:
    ``(y [B,H,V] in v's dtype, state)``.
  """
  config = dict(
    chunk_size=chunk_size,
    omega_window=omega_window,
    feature_map=feature_map,
    objective=objective,
    optimizer=optimizer,
    ns_steps=ns_steps,
    activation=activation,
    residual=residual,
    self_targets=self_targets,
  )
  gates = {"lr": lr, "momentum": momentum, "decay": decay, "omega_weights": omega_weights}
  inputs, state = _prepare(q, k, v, gates, memory, time_axis=False, config=config)
  y, final = reference.step(
    state,
    *inputs,
    chunk_size=chunk_size,
    window=omega_window,
    objective=objective,
    optimizer=optimizer,
    ns_steps=ns_steps,
    activation=activation,
    residual=residual,
    self_targets=self_targets,
  )
  return y.astype(v.dtype), final


__all__ = ["feature_dim", "init_memory", "neural_memory", "neural_memory_step"]
