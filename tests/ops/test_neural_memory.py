"""Conformance of ``ops.memory.neural_memory`` implementations against the reference.

Outputs, final states and gradients of every input (queries, keys, values, the three gates,
the Omega weights and the initial weights) for depth-1 and depth-2 memories, lengths that are
not chunk multiples, f32 and bf16 inputs, and every option (Omega window, feature maps, Muon,
the Hebbian "dot" objective, self-generated targets).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.memory.neural import init_memory, neural_memory

# (dtype, what) -> (atol, rtol), compared as max|x - y| <= atol + rtol * max|y|.
TOLERANCES = {
  # Both sides compute in float32; only summation order differs.
  ("float32", "value"): (1e-5, 1e-5),
  # Gradients pass through the second-order inner step and the Newton-Schulz iterations.
  ("float32", "grad"): (1e-4, 1e-4),
  # Both sides compute in float32 from the same bf16 inputs and round once at the end:
  # results differ by at most about one bf16 ulp (2^-8 relative).
  ("bfloat16", "value"): (1e-2, 1e-2),
  ("bfloat16", "grad"): (2e-2, 2e-2),
}

B, H, K, V, HIDDEN = 2, 2, 4, 4, 8


def assert_close(x, y, dtype, what, name=""):
  atol, rtol = TOLERANCES[(jnp.dtype(dtype).name, what)]
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  assert x.shape == y.shape, (name, x.shape, y.shape)
  assert np.all(np.isfinite(x)), f"{name}: non-finite values"
  err = float(np.max(np.abs(x - y), initial=0.0))
  bound = atol + rtol * float(np.max(np.abs(y), initial=0.0))
  assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def make_inputs(seed, length, dtype=jnp.float32, depth=1, feature_map="identity", heads=H):
  """Small, well-conditioned inputs: unit-norm keys/queries, moderate learning rates."""
  ks = jax.random.split(jax.random.key(seed), 9)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (B, length, heads, K))).astype(dtype)
  k = unit(jax.random.normal(ks[1], (B, length, heads, K))).astype(dtype)
  v = jax.random.normal(ks[2], (B, length, heads, V)).astype(dtype)
  gates = {
    "lr": 0.3 * jax.random.uniform(ks[3], (B, length, heads)),
    "momentum": 0.9 * jax.random.uniform(ks[4], (B, length, heads)),
    "decay": 0.2 * jax.random.uniform(ks[5], (B, length, heads)),
  }
  gates = {name: g.astype(dtype) for name, g in gates.items()}
  memory = init_memory(
    ks[6],
    heads=heads,
    key_dim=K,
    value_dim=V,
    hidden=None if depth == 1 else HIDDEN,
    feature_map=feature_map,
  )
  omega = (0.5 + jax.random.uniform(ks[7], (B, length, heads))).astype(dtype)
  return (q, k, v), gates, memory, omega


def state_loss(state, seed=1):
  """A random linear functional of the final weights and momentum."""
  total = 0.0
  leaves = jax.tree.leaves((state["weights"], state["momentum"]))
  for i, leaf in enumerate(leaves):
    w = jax.random.normal(jax.random.key(seed + i), leaf.shape)
    total += jnp.sum(w * leaf)
  return total


# XLA's CPU backend optimisations cost most of these tests' time (compiling the reference's
# second-order scans); they do not change float32 semantics.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _op(implementation, options):
  def run(qkv, gates, memory, omega):
    return neural_memory(
      *qkv,
      **gates,
      memory=memory,
      omega_weights=omega,
      implementation=implementation,
      **dict(options),
    )

  return run


@functools.cache
def _forward(implementation, options):
  return fast_jit(_op(implementation, options))


@functools.cache
def _forward_and_grad(implementation, options):
  forward = _op(implementation, options)

  def loss(qkv, gates, memory, omega):
    y, state = forward(qkv, gates, memory, omega)
    cy = jax.random.normal(jax.random.key(7), y.shape)
    return jnp.sum(y.astype(jnp.float32) * cy) + state_loss(state), (y, state)

  return fast_jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def run(implementation, qkv, gates, memory, omega=None, **options):
  """``neural_memory`` compiled once per implementation and options."""
  return _forward(implementation, tuple(sorted(options.items())))(qkv, gates, memory, omega)


def run_and_grad(implementation, qkv, gates, memory, omega=None, **options):
  """Outputs, final state and gradients of a scalar loss wrt every differentiable input."""
  fn = _forward_and_grad(implementation, tuple(sorted(options.items())))
  grads, (y, state) = fn(qkv, gates, memory, omega)
  return y, state, grads


class NeuralMemoryConformance:
  """Subclass with ``implementation`` set to check an implementation against the reference."""

  implementation: str

  def check(self, length, depth, chunk_size, dtype=jnp.float32, seed=0, grads=True, **options):
    fmap = options.get("feature_map", "identity")
    qkv, gates, memory, omega = make_inputs(seed, length, dtype, depth, fmap)
    if not options.pop("use_omega_weights", False):
      omega = None
    options["chunk_size"] = chunk_size
    if not grads:
      y, state = run(self.implementation, qkv, gates, memory, omega, **options)
      y_ref, state_ref = run("reference", qkv, gates, memory, omega, **options)
    else:
      y, state, g = run_and_grad(self.implementation, qkv, gates, memory, omega, **options)
      y_ref, state_ref, g_ref = run_and_grad("reference", qkv, gates, memory, omega, **options)
      names = ["qkv", "gates", "memory", "omega"]
      for name, a, b in zip(names, g, g_ref):
        for (path, x), x_ref in zip(
          jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
        ):
          assert x.dtype == x_ref.dtype
          assert_close(x, x_ref, dtype, "grad", f"d{name}{jax.tree_util.keystr(path)}")
    assert y.dtype == qkv[2].dtype and y.shape == (B, length, H, V)
    assert_close(y, y_ref, dtype, "value", "y")
    for (path, x), x_ref in zip(
      jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(state_ref), strict=True
    ):
      # The state is float32 whatever the input dtype.
      assert_close(x, x_ref, jnp.float32, "value", f"state{jax.tree_util.keystr(path)}")

  # The unmarked cases cover each axis once (compiling the reference's second-order scan is
  # what costs time on CPU); ``test_grid`` and the ``slow`` variants cover the product.
  @pytest.mark.parametrize(
    "depth, chunk_size, length",
    [(2, 1, 7), (1, 4, 7), (2, 16, 50)]
    + [pytest.param(*c, marks=pytest.mark.slow) for c in [(1, 1, 7), (2, 4, 7), (1, 16, 50)]],
  )
  def test_values_and_grads(self, depth, chunk_size, length):
    self.check(length, depth, chunk_size)

  @pytest.mark.parametrize("depth", [2, pytest.param(1, marks=pytest.mark.slow)])
  def test_bf16(self, depth):
    self.check(7, depth, 4, dtype=jnp.bfloat16)

  @pytest.mark.slow
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  @pytest.mark.parametrize("depth", [1, 2])
  @pytest.mark.parametrize("chunk_size", [1, 4, 16])
  @pytest.mark.parametrize("length", [1, 7, 50])
  def test_grid(self, length, chunk_size, depth, dtype):
    self.check(length, depth, chunk_size, dtype=dtype)

  @pytest.mark.parametrize("depth", [2, pytest.param(1, marks=pytest.mark.slow)])
  def test_omega_window(self, depth):
    # A window longer than the chunk, so it reaches across chunk boundaries.
    self.check(11, depth, 4, omega_window=6, use_omega_weights=True)

  @pytest.mark.parametrize("depth", [2, pytest.param(1, marks=pytest.mark.slow)])
  def test_muon(self, depth):
    self.check(9, depth, 4, optimizer="muon", ns_steps=3, omega_window=2)

  @pytest.mark.parametrize(
    "depth, chunk_size, options",
    [(1, 1, dict(omega_window=2)), (2, 4, dict(omega_window=6))]
    + [
      pytest.param(*c, marks=pytest.mark.slow)
      for c in [
        (1, 4, dict(omega_window=3)),
        (2, 1, {}),
        (2, 4, dict(optimizer="muon", ns_steps=3, omega_window=2)),
      ]
    ],
  )
  def test_dot_objective(self, depth, chunk_size, options):
    # The Hebbian loss -<M(k), v>, with momentum, decay and Omega weights on a window that
    # reaches across chunk boundaries (depth 1: the gradient does not depend on M at all).
    self.check(11, depth, chunk_size, objective="dot", use_omega_weights=True, **options)

  @pytest.mark.parametrize(
    "depth, chunk_size, options",
    [(1, 1, {}), (2, 1, {}), (2, 4, dict(omega_window=6))]
    + [
      pytest.param(*c, marks=pytest.mark.slow)
      for c in [
        (1, 4, dict(omega_window=3)),
        (2, 16, {}),
        (2, 4, dict(objective="dot", omega_window=2)),
        (2, 4, dict(optimizer="muon", ns_steps=3, omega_window=2)),
        (2, 4, dict(residual=True, activation="gelu")),
        (2, 4, dict(feature_map="poly2")),
      ]
    ],
  )
  def test_self_targets(self, depth, chunk_size, options):
    # Nested Learning's self-generated targets M0(phi(v)), with momentum, decay and Omega
    # weights; the window of 6 reaches two chunks back, whose tokens' targets are read at the
    # current chunk's M0. The gradient wrt v flows only through the targets.
    self.check(11, depth, chunk_size, self_targets=True, use_omega_weights=True, **options)

  @pytest.mark.parametrize(
    "feature_map", ["poly2", "poly3", pytest.param("elu1", marks=pytest.mark.slow)]
  )
  def test_feature_maps(self, feature_map):
    self.check(7, 2, 4, grads=False, feature_map=feature_map)

  @pytest.mark.slow
  @pytest.mark.parametrize("feature_map", ["poly2", "poly3", "elu1"])
  def test_feature_map_grads(self, feature_map):
    self.check(7, 2, 4, feature_map=feature_map)

  @pytest.mark.parametrize("activation", ["gelu", pytest.param("tanh", marks=pytest.mark.slow)])
  def test_residual_and_activation(self, activation):
    self.check(7, 2, 4, grads=False, activation=activation, residual=True)


class TestXla(NeuralMemoryConformance):
  implementation = "xla"


def test_default_is_xla_on_cpu():
  qkv, gates, memory, _ = make_inputs(0, 5)
  y, _ = run(None, qkv, gates, memory, chunk_size=2)
  y_xla, _ = run("xla", qkv, gates, memory, chunk_size=2)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_xla))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_xla_lowers_for_accelerators(platform):
  """The xla version (forward and backward) lowers for TPU and GPU without the hardware."""
  qkv, gates, memory, _ = make_inputs(0, 8, depth=2)

  @jax.jit
  def fwd_bwd(qkv, gates, memory):
    def loss(qkv, gates, memory):
      y, state = neural_memory(*qkv, **gates, memory=memory, chunk_size=4, implementation="xla")
      return jnp.sum(y) + state_loss(state)

    return jax.grad(loss, argnums=(0, 1, 2))(qkv, gates, memory)

  lowered = fwd_bwd.trace(qkv, gates, memory).lower(lowering_platforms=(platform,))
  assert "func" in lowered.as_text()[:10000]
