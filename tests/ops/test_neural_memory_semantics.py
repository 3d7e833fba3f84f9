"""What ``neural_memory`` means: independent definitions, decoding, continuation, bad input.

The implementations are checked against each other in ``test_neural_memory.py``; here the op
is checked against things written from the math alone (a per-token ``jax.grad`` loop, the
delta rule, causal linear attention for the Hebbian objective, the self-generated-target
recurrence, Newton-Schulz's invariant, the polynomial kernels' Taylor series) and against
itself (step decoding and split sequences equal one call).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.memory.neural import common, feature_dim, init_memory, neural_memory, neural_memory_step
from tests.ops.test_neural_memory import B, H, K, V, assert_close, fast_jit, make_inputs, run


def _mlp(m, x, activation):
  """The memory read ``M(x)``: depth 1 ``x W`` or depth 2 ``act(x W1) W2``."""
  if "w" in m:
    return x @ m["w"]
  return common.ACTIVATIONS[activation](x @ m["w1"]) @ m["w2"]


def independent_titans(qkv, gates, memory, omega=None, window=1, activation="silu", objective="l2"):
  """Token-by-token Titans/ATLAS at chunk_size=1, written from the paper's equations.

  Python loop over tokens; per (batch, head) ``jax.grad`` of the windowed squared error (or,
  with ``objective="dot"``, of the windowed negative inner product ``-<M(k), v>``).
  """
  q, k, v = (np.asarray(x, np.float32) for x in qkv)
  lr, eta, alpha = (np.asarray(gates[n], np.float32) for n in ("lr", "momentum", "decay"))
  omega = np.ones(lr.shape, np.float32) if omega is None else np.asarray(omega, np.float32)
  batch, length, heads, _ = q.shape

  forward = functools.partial(_mlp, activation=activation)

  def window_loss(m, keys, values, weights):
    if objective == "dot":
      return -sum(w * jnp.dot(forward(m, x), y) for x, y, w in zip(keys, values, weights))
    return sum(w * jnp.sum((forward(m, x) - y) ** 2) for x, y, w in zip(keys, values, weights))

  ys = np.zeros((batch, length, heads, v.shape[-1]), np.float32)
  for b in range(batch):
    for h in range(heads):
      m = {name: jnp.asarray(w[h]) for name, w in memory.items()}
      u = jax.tree.map(jnp.zeros_like, m)
      for t in range(length):
        s = range(max(0, t - window + 1), t + 1)
        g = jax.grad(window_loss)(m, k[b, s, h], v[b, s, h], omega[b, s, h])
        e, th, keep = eta[b, t, h], lr[b, t, h], 1 - alpha[b, t, h]
        u = jax.tree.map(lambda u, g, e=e, th=th: e * u - th * g, u, g)
        m = jax.tree.map(lambda m, u, keep=keep: keep * m + u, m, u)
        ys[b, t, h] = forward(m, q[b, t, h])
  return ys


def independent_self_targets(qkv, gates, memory, omega=None, window=1, activation="silu"):
  """Nested Learning's self-generated targets at chunk_size=1, token by token in plain jnp.

  Per (batch, head), with ``M = M_{t-1}``: the window's targets ``v_hat_s = M(v_s)`` are read
  first and handed to the loss as arrays, so ``jax.grad`` (wrt its first argument) holds them
  fixed; then ``g_t = grad sum_s gamma_s ||M(k_s) - v_hat_s||^2`` at ``M``,
  ``U_t = eta_t U_{t-1} - theta_t g_t``, ``M_t = (1 - alpha_t) M_{t-1} + U_t`` and
  ``y_t = M_t(q_t)``. Differentiable end to end (the outer gradient reaches ``M_{t-1}`` and
  ``v`` through the targets).

  Returns:
    ``(y [B,T,H,V], final weights {name: [B,H,m,n]})``.
  """
  q, k, v = qkv
  lr, eta, alpha = (gates[n] for n in ("lr", "momentum", "decay"))
  omega = jnp.ones(lr.shape) if omega is None else omega
  batch, length, heads, _ = q.shape

  forward = functools.partial(_mlp, activation=activation)

  def window_loss(m, keys, targets, weights):
    return sum(w * jnp.sum((forward(m, x) - y) ** 2) for x, y, w in zip(keys, targets, weights))

  ys, finals = [], []
  for b in range(batch):
    for h in range(heads):
      m = {name: w[h] for name, w in memory.items()}
      u = jax.tree.map(jnp.zeros_like, m)
      for t in range(length):
        s = slice(max(0, t - window + 1), t + 1)
        targets = [forward(m, x) for x in v[b, s, h]]
        g = jax.grad(window_loss)(m, k[b, s, h], targets, omega[b, s, h])
        e, th, keep = eta[b, t, h], lr[b, t, h], 1 - alpha[b, t, h]
        u = jax.tree.map(lambda u, g, e=e, th=th: e * u - th * g, u, g)
        m = jax.tree.map(lambda m, u, keep=keep: keep * m + u, m, u)
        ys.append(forward(m, q[b, t, h]))
      finals.append(m)
  y = jnp.stack(ys).reshape(batch, heads, length, -1).transpose(0, 2, 1, 3)
  final = {
    name: jnp.stack([f[name] for f in finals]).reshape(batch, heads, *memory[name].shape[1:])
    for name in memory
  }
  return y, final


def _self_target_memory(depth, value_dim=6):
  # An output width V != K, so a mix-up of the target's input and output widths cannot pass.
  hidden = None if depth == 1 else 8
  return init_memory(jax.random.key(20), heads=H, key_dim=K, value_dim=value_dim, hidden=hidden)


@pytest.mark.parametrize(
  "implementation, depth, window",
  [("reference", 1, 1), ("xla", 1, 1), ("reference", 2, 1), ("xla", 2, 1), ("xla", 2, 3)],
)
def test_self_targets_chunk_one_is_the_paper_recurrence(implementation, depth, window):
  """``self_targets``: ``v_hat_t = M_{t-1}(v_t)`` held fixed in the inner gradient at
  ``M_{t-1}`` (Nested Learning's self-modifying memories), momentum and decay included."""
  qkv, gates, _, omega = make_inputs(21, 6)
  memory = _self_target_memory(depth)
  opts = dict(chunk_size=1, omega_window=window, self_targets=True)
  y, state = run(implementation, qkv, gates, memory, omega, **opts)
  y_ref, final_ref = independent_self_targets(qkv, gates, memory, omega, window)
  assert y.shape == (B, 6, H, 6)
  assert_close(y, y_ref, jnp.float32, "value", "y")
  for name, w in final_ref.items():
    assert_close(state["weights"][name], w, jnp.float32, "value", name)
  # ... and it is not the ordinary loss on the values: the targets are M(v), not v.
  if depth == 1 and window == 1:
    plain = independent_titans(qkv, gates, {"w": memory["w"][..., :V]})
    assert float(jnp.max(jnp.abs(y[..., :V] - plain))) > 1e-3


def test_self_targets_outer_gradient_flows_through_the_targets():
  """The inner gradient holds ``v_hat`` fixed, the outer one does not: gradients wrt ``v``
  (which enters only through the targets), the keys, the learning rates and the initial
  weights equal those of the plain-jnp recurrence."""
  qkv, gates, _, _ = make_inputs(22, 4)
  memory = _self_target_memory(2)
  cy = jax.random.normal(jax.random.key(23), (B, 4, H, 6))

  def loss(fn, k, v, lr, memory):
    y, final = fn((qkv[0], k, v), {**gates, "lr": lr}, memory)
    return jnp.sum(y * cy) + sum(jnp.sum(jnp.sin(w)) for w in jax.tree.leaves(final))

  def op(qkv, gates, memory):
    y, state = neural_memory(
      *qkv, **gates, memory=memory, chunk_size=1, self_targets=True, implementation="xla"
    )
    return y, state["weights"]

  args = (qkv[1], qkv[2], gates["lr"], memory)
  grads = fast_jit(jax.grad(lambda *a: loss(op, *a), argnums=(0, 1, 2, 3)))(*args)
  indep = lambda qkv, gates, memory: independent_self_targets(qkv, gates, memory)
  expected = fast_jit(jax.grad(lambda *a: loss(indep, *a), argnums=(0, 1, 2, 3)))(*args)
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected)):
    assert_close(g, e, jnp.float32, "grad", f"d{jax.tree_util.keystr(path)}")
  assert float(jnp.max(jnp.abs(grads[1]))) > 1e-3  # v matters, through the targets only


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_self_targets_at_the_keys_only_decay(implementation):
  """With ``v = k`` the memory already predicts its own targets at ``M0``, so every inner
  gradient is 0 at any chunk size and window: momentum stays 0 and ``M_T = prod(1 - alpha) M_0``.
  (Targets read at any weights other than the gradient's ``M0`` break this.)"""
  qkv, gates, memory, omega = make_inputs(24, 7, depth=2)
  q, k, _ = qkv
  opts = dict(chunk_size=4, omega_window=3, self_targets=True)
  _, state = run(implementation, (q, k, k), gates, memory, omega, **opts)
  keep = jnp.prod(1.0 - gates["decay"], axis=1)[..., None, None]  # [B,H,1,1]
  for name, w in memory.items():
    assert_close(state["weights"][name], keep * w, jnp.float32, "value", name)
    assert_close(state["momentum"][name], jnp.zeros_like(keep * w), jnp.float32, "value", name)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("depth", [1, 2])
def test_chunk_one_is_sequential_titans(implementation, depth):
  qkv, gates, memory, _ = make_inputs(3, 6, depth=depth)
  y, _ = run(implementation, qkv, gates, memory, chunk_size=1)
  assert_close(y, independent_titans(qkv, gates, memory), jnp.float32, "value", "y")


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_omega_window_is_atlas(implementation):
  """ATLAS's Omega rule: the inner loss sums gamma-weighted errors of the last c tokens."""
  qkv, gates, memory, omega = make_inputs(4, 6, depth=2)
  y, _ = run(implementation, qkv, gates, memory, omega, chunk_size=1, omega_window=3)
  expected = independent_titans(qkv, gates, memory, omega, window=3)
  assert_close(y, expected, jnp.float32, "value", "y")


def test_dot_objective_is_the_hebbian_loss():
  """``objective="dot"``: gradients of the gamma-weighted ``-<M(k_s), v_s>`` over the window."""
  qkv, gates, memory, omega = make_inputs(12, 6, depth=2)
  opts = dict(chunk_size=1, omega_window=2, objective="dot")
  y, _ = run("reference", qkv, gates, memory, omega, **opts)
  expected = independent_titans(qkv, gates, memory, omega, window=2, objective="dot")
  assert_close(y, expected, jnp.float32, "value", "y")


@pytest.mark.parametrize(
  "implementation, chunk_size, window",
  [("reference", 1, 1), ("xla", 1, 1), ("xla", 4, 1), ("xla", 4, 3)],
)
def test_dot_objective_depth_one_is_linear_attention(implementation, chunk_size, window):
  """Depth 1, theta = 1, eta = alpha = 0, identity features, M_0 = 0: the Hebbian step is
  ``W_t = W_{t-1} + sum_{s in window(t)} gamma_s k_s (x) v_s`` (no factor 2 and no
  ``1/sqrt(K)``: the op does not scale keys), so ``o_t = sum_{s<=t} n_ts gamma_s (q_t.k_s) v_s``
  with ``n_ts = min(c, t - s + 1)`` (a token stays in the window for c steps). With ``c = 1``
  and gamma = 1 that is unnormalised causal linear attention, at any chunk size."""
  qkv, gates, memory, omega = make_inputs(11, 9, depth=1)
  ones, zeros = jnp.ones_like(gates["lr"]), jnp.zeros_like(gates["lr"])
  gates = dict(lr=ones, momentum=zeros, decay=zeros)
  memory = {"w": jnp.zeros_like(memory["w"])}
  if window == 1:
    omega = None
  opts = dict(chunk_size=chunk_size, omega_window=window, objective="dot")
  y, state = run(implementation, qkv, gates, memory, omega, **opts)
  q, k, v = (np.asarray(x, np.float64) for x in qkv)
  gamma = np.ones(q.shape[:3]) if omega is None else np.asarray(omega, np.float64)
  t = np.arange(q.shape[1])
  counts = np.clip(np.minimum(window, t[:, None] - t[None, :] + 1), 0, None)  # [t, s]
  scores = np.einsum("bthk,bshk->bhts", q, k) * counts * np.moveaxis(gamma, 1, 2)[:, :, None]
  expected = np.einsum("bhts,bshv->bthv", scores, v)
  assert_close(y, expected, jnp.float32, "value", "y")
  w_final = np.einsum("bs,bshk,bshv->bhkv", counts[-1:].repeat(B, 0), gamma[..., None] * k, v)
  assert_close(state["weights"]["w"], w_final, jnp.float32, "value", "W")


def test_omega_window_one_is_plain():
  qkv, gates, memory, omega = make_inputs(5, 9, depth=2)
  plain, _ = run("xla", qkv, gates, memory, chunk_size=4)
  windowed, _ = run("xla", qkv, gates, memory, jnp.ones(omega.shape), chunk_size=4, omega_window=1)
  assert_close(windowed, plain, jnp.float32, "value", "y")
  # ... and the window is not ignored: c = 2 gives something else.
  wider, _ = run("xla", qkv, gates, memory, chunk_size=4, omega_window=2)
  assert float(jnp.max(jnp.abs(wider - plain))) > 1e-3


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_depth_one_without_momentum_is_the_delta_rule(implementation):
  """eta = alpha = 0, theta = beta / 2: S_t = S_{t-1} + beta k (v - S^T k)^T, y = S_t^T q."""
  qkv, gates, memory, _ = make_inputs(6, 9, depth=1)
  beta = np.asarray(gates["lr"]) * 3.0  # up to 0.9
  zeros = jnp.zeros_like(gates["lr"])
  gates = dict(lr=jnp.asarray(beta / 2), momentum=zeros, decay=zeros)
  y, state = run(implementation, qkv, gates, memory, chunk_size=1)
  q, k, v = (np.asarray(x, np.float64) for x in qkv)
  s = np.broadcast_to(np.asarray(memory["w"], np.float64), (B, H, K, V)).copy()
  expected = np.zeros(v.shape)
  for t in range(q.shape[1]):
    err = v[:, t] - np.einsum("bhk,bhkv->bhv", k[:, t], s)
    s += beta[:, t, :, None, None] * k[:, t, :, :, None] * err[:, :, None, :]
    expected[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], s)
  assert_close(y, expected, jnp.float32, "value", "y")
  assert_close(state["weights"]["w"], s, jnp.float32, "value", "S")


@pytest.mark.parametrize(
  "options",
  [
    dict(chunk_size=1),
    dict(chunk_size=4, omega_window=3),
    dict(chunk_size=2, optimizer="muon", ns_steps=2),
    dict(chunk_size=4, omega_window=3, objective="dot", feature_map="poly3"),
    dict(chunk_size=4, omega_window=3, self_targets=True),
    dict(chunk_size=1, self_targets=True),
  ],
  ids=["titans", "omega", "muon", "dot-poly3", "self_targets", "self_targets-chunk1"],
)
def test_step_decoding_equals_full_op(options):
  fmap = options.get("feature_map", "identity")
  qkv, gates, memory, omega = make_inputs(7, 7, depth=2, feature_map=fmap)
  y, state = neural_memory(*qkv, **gates, memory=memory, omega_weights=omega, **options)
  step = fast_jit(
    lambda *a, memory: neural_memory_step(
      *a[:3], **a[3], omega_weights=a[4], memory=memory, **options
    )
  )
  carry = memory
  for t in range(qkv[0].shape[1]):
    tok = {n: g[:, t] for n, g in gates.items()}
    y_t, carry = step(*(x[:, t] for x in qkv), tok, omega[:, t], memory=carry)
    assert_close(y_t, y[:, t], jnp.float32, "value", f"y[{t}]")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(carry), jax.tree.leaves(state)):
    assert_close(a, b, jnp.float32, "value", f"state{jax.tree_util.keystr(path)}")


@pytest.mark.parametrize(
  "implementation, jit, self_targets",
  [("xla", False, False), ("xla", True, False), ("reference", True, False), ("xla", True, True)],
  ids=["xla-static_offset", "xla-traced_offset", "reference", "xla-self_targets"],
)
def test_split_sequence_equals_one_call(implementation, jit, self_targets):
  """A state handed back as ``memory`` continues mid-chunk (the split is not chunk-aligned)."""
  qkv, gates, memory, omega = make_inputs(8, 11, depth=2)
  opts = dict(
    chunk_size=4, omega_window=3, implementation=implementation, self_targets=self_targets
  )
  call = lambda qkv, gates, omega, memory: neural_memory(
    *qkv, **gates, memory=memory, omega_weights=omega, **opts
  )
  y, state = call(qkv, gates, omega, memory)
  cut = lambda tree, sl: jax.tree.map(lambda x: x[:, sl], tree)
  second = fast_jit(call) if jit else call
  y1, mid = call(*cut((qkv, gates, omega), slice(0, 5)), memory)
  y2, final = second(*cut((qkv, gates, omega), slice(5, None)), mid)
  assert_close(jnp.concatenate([y1, y2], axis=1), y, jnp.float32, "value", "y")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(final), jax.tree.leaves(state)):
    assert_close(a, b, jnp.float32, "value", f"state{jax.tree_util.keystr(path)}")


def test_batched_initial_weights_equal_shared():
  qkv, gates, memory, _ = make_inputs(9, 5, depth=2)
  batched = jax.tree.map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), memory)
  y, _ = run("xla", qkv, gates, memory, chunk_size=2)
  y_b, _ = run("xla", qkv, gates, batched, chunk_size=2)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_b))
  # Different weights per sequence give different outputs per sequence only.
  batched = {n: w.at[1].multiply(2.0) for n, w in batched.items()}
  y_b, _ = run("xla", qkv, gates, batched, chunk_size=2)
  np.testing.assert_array_equal(np.asarray(y[0]), np.asarray(y_b[0]))
  assert float(jnp.max(jnp.abs(y[1] - y_b[1]))) > 1e-3


def test_newton_schulz_orthogonalises():
  g = jax.random.normal(jax.random.key(0), (3, 8, 5))
  sv = np.linalg.svd(np.asarray(common.newton_schulz(g, 5)), compute_uv=False)
  # Muon's quintic iteration drives singular values into roughly [0.7, 1.2], not exactly 1.
  assert sv.min() > 0.5 and sv.max() < 1.3, sv
  sv_in = np.linalg.svd(np.asarray(g), compute_uv=False)
  assert sv_in.max() / sv_in.min() > 2.0  # the input was far from orthogonal
  assert np.all(np.isfinite(jax.grad(lambda x: common.newton_schulz(x, 5).sum())(0.0 * g)))


@pytest.mark.parametrize(
  "feature_map, width",
  [("poly2", 1 + K + K * K), ("poly3", math.comb(K + 3, 3)), ("poly4", math.comb(K + 4, 4))],
)
def test_poly_feature_map_kernel(feature_map, width):
  """``phi(x) . phi(y) = sum_{i<=P} (x.y)^i / i!``, the exponential series truncated at P."""
  degree = int(feature_map[4:])
  x, y = jax.random.normal(jax.random.key(1), (2, 6, K))
  phi = lambda z: common.apply_feature_map(z, feature_map)
  dots = np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64), axis=-1)
  assert phi(x).shape == (6, width) and feature_dim(K, feature_map) == width
  series = sum(dots**i / math.factorial(i) for i in range(degree + 1))
  np.testing.assert_allclose(jnp.sum(phi(x) * phi(y), -1), series, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_less(0.0, common.apply_feature_map(x, "elu1"))


def test_poly_features_approach_the_exponential_kernel():
  """For |x.y| <= 1/2 the error to ``exp(x.y)`` is within Taylor's remainder bound
  ``|x.y|^(P+1) e^|x.y| / (P+1)!`` and shrinks with P."""
  x, y = jax.random.normal(jax.random.key(2), (2, 64, K))
  unit = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  x, y = unit(x), 0.5 * unit(y)
  dots = np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64), axis=-1)
  errors = []
  for degree in (2, 3, 4):
    phi = lambda z, d=degree: common.apply_feature_map(z, f"poly{d}")
    err = np.abs(np.asarray(jnp.sum(phi(x) * phi(y), -1), np.float64) - np.exp(dots))
    bound = np.abs(dots) ** (degree + 1) * np.exp(np.abs(dots)) / math.factorial(degree + 1)
    np.testing.assert_array_less(err, bound + 1e-6)
    errors.append(err.max())
  assert errors[0] > errors[1] > errors[2] and errors[0] > 1e-3, errors


def test_gates_reach_the_output():
  """Gradients wrt every gate and the initial weights are nonzero (they are all used)."""
  qkv, gates, memory, omega = make_inputs(10, 6, depth=2)

  def loss(gates, memory, omega):
    y, _ = neural_memory(
      *qkv, **gates, memory=memory, omega_weights=omega, chunk_size=2, omega_window=2
    )
    return jnp.sum(y**2)

  for leaf in jax.tree.leaves(fast_jit(jax.grad(loss, argnums=(0, 1, 2)))(gates, memory, omega)):
    assert float(jnp.max(jnp.abs(leaf))) > 1e-6


def _bad(**changes):
  qkv, gates, memory, _ = make_inputs(0, 5, depth=2)
  kwargs = dict(zip("qkv", qkv)) | gates | dict(memory=memory, chunk_size=4) | changes
  return kwargs


@pytest.mark.parametrize(
  "changes, match",
  [
    (dict(chunk_size=3), "power of two"),
    (dict(chunk_size=0), "power of two"),
    (dict(k=jnp.zeros((B, 5, H, K + 1))), "q and k"),
    (dict(v=jnp.zeros((B, 4, H, V))), "v must be"),
    (
      dict(q=jnp.zeros((B, 0, H, K)), k=jnp.zeros((B, 0, H, K)), v=jnp.zeros((B, 0, H, V))),
      "lr has shape|empty",
    ),
    (dict(lr=jnp.full((B, 5, H), 1.5)), r"lr must lie in \[0.0, 1.0\]"),
    (dict(decay=jnp.full((B, 5, H), -0.1)), "decay must lie"),
    (dict(momentum=jnp.zeros((B, 5))), "momentum has shape"),
    (dict(omega_weights=jnp.full((B, 5, H), -1.0)), "omega_weights must lie"),
    (dict(memory={"w": jnp.zeros((H, K + 1, V))}), r"memory\['w'\] has shape"),
    (dict(memory={"w1": jnp.zeros((H, K, 3))}), "keys"),
    (dict(feature_map="poly2"), r"memory\['w1'\] has shape"),
    (dict(feature_map="cosine"), "unknown feature_map"),
    (dict(feature_map="poly5"), "unknown feature_map"),
    (dict(objective="hebbian"), "unknown objective"),
    (dict(optimizer="adam"), "unknown optimizer"),
    (dict(activation="swish"), "unknown activation"),
    (dict(omega_window=0), "omega_window"),
    (dict(implementation="triton"), "unknown implementation"),
    (dict(self_targets=True, v=jnp.zeros((B, 5, H, K + 1))), "keys' shape"),
    (dict(self_targets=1), "self_targets must be a bool"),
  ],
)
def test_bad_input_raises_before_tracing(changes, match):
  with pytest.raises(ValueError, match=match):
    neural_memory(**_bad(**changes))


def test_residual_needs_matching_dims():
  qkv, gates, _, _ = make_inputs(0, 5)
  memory = init_memory(jax.random.key(0), heads=H, key_dim=K, value_dim=V, feature_map="poly2")
  with pytest.raises(ValueError, match="residual"):
    neural_memory(*qkv, **gates, memory=memory, feature_map="poly2", residual=True)


def test_self_targets_shapes():
  """``self_targets``: V is the memory's output width; the residual read still needs F == V,
  and the window stores the targets' F-wide inputs, so a state of the other mode whose
  widths differ is refused."""
  qkv, gates, _, _ = make_inputs(0, 5)
  memory = _self_target_memory(1, value_dim=V + 2)
  y, _ = neural_memory(*qkv, **gates, memory=memory, self_targets=True)
  assert y.shape == (B, 5, H, V + 2)
  with pytest.raises(ValueError, match="residual"):
    neural_memory(*qkv, **gates, memory=memory, self_targets=True, residual=True)
  memory = init_memory(jax.random.key(0), heads=H, key_dim=K, value_dim=V, feature_map="poly2")
  opts = dict(omega_window=2, feature_map="poly2")
  _, state = neural_memory(*qkv, **gates, memory=memory, **opts)
  with pytest.raises(ValueError, match="window_v"):
    neural_memory(*qkv, **gates, memory=state, self_targets=True, **opts)


def test_state_with_wrong_window_raises():
  qkv, gates, memory, _ = make_inputs(0, 5)
  _, state = neural_memory(*qkv, **gates, memory=memory, omega_window=2)
  with pytest.raises(ValueError, match="window_k"):
    neural_memory(*qkv, **gates, memory=state, omega_window=3)
