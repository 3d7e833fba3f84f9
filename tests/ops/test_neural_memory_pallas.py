"""Pallas neural memory kernel (``ops/memory/neural/pallas_*``).

On CPU the kernel runs in interpret mode against the token-by-token reference (the definition):
outputs, final states and gradients of every input (q, k, v, the three gates, the Omega weights
and the initial weights). The TPU interpreter starts fresh outputs and scratch as NaN
(``InterpretParams(uninitialized_memory="nan")``) and the generic one used for the GPU kernel
does so by default, so an element the kernel forgets to write fails the comparison. Lowering
for ``tpu`` and ``cuda`` at a realistic size catches what only the real compilers' front ends
reject. Every case is one ``jit`` compiled at XLA optimisation level 0 (the helpers of
``test_neural_memory``), since compiling dominates and the level does not change the arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.common.dispatch import NotSupportedError
from ops.memory.neural import init_memory, neural_memory, pallas_common
from tests.ops.test_neural_memory import assert_close, fast_jit, run

# Triton needs every tile dim a power of two >= 16, so the GPU kernel is tested at these sizes;
# T <= 40 keeps the interpreter's cost down.
B, H, K, V, HIDDEN = 1, 2, 16, 16, 16


def make_inputs(
  seed, length, depth, heads=H, feature_map="identity", value_dim=V, hidden_dim=HIDDEN
):
  """Unit-norm keys/queries, moderate gates, positive Omega weights (as in the xla tests)."""
  ks = jax.random.split(jax.random.key(seed), 8)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (B, length, heads, K)))
  k = unit(jax.random.normal(ks[1], (B, length, heads, K)))
  v = jax.random.normal(ks[2], (B, length, heads, value_dim))
  gates = {
    "lr": 0.3 * jax.random.uniform(ks[3], (B, length, heads)),
    "momentum": 0.9 * jax.random.uniform(ks[4], (B, length, heads)),
    "decay": 0.2 * jax.random.uniform(ks[5], (B, length, heads)),
  }
  hidden = None if depth == 1 else hidden_dim
  memory = init_memory(
    ks[6], heads=heads, key_dim=K, value_dim=value_dim, hidden=hidden, feature_map=feature_map
  )
  omega = 0.5 + jax.random.uniform(ks[7], (B, length, heads))
  return (q, k, v), gates, memory, omega


def state_loss(state, seed=1):
  """A random linear functional of every float leaf of the state (chunk_start included)."""
  leaves = jax.tree.leaves({k: x for k, x in state.items() if k != "position"})
  return sum(
    jnp.sum(jax.random.normal(jax.random.key(seed + i), x.shape) * x) for i, x in enumerate(leaves)
  )


def _loss(implementation, options, position=None):
  def loss(qkv, gates, memory, omega):
    memory = memory if position is None else {**memory, "position": position}
    y, state = neural_memory(
      *qkv, **gates, memory=memory, omega_weights=omega, implementation=implementation, **options
    )
    cy = jax.random.normal(jax.random.key(7), y.shape)
    return jnp.sum(y * cy) + state_loss(state), (y, state)

  return loss


@functools.cache
def _grad_fn(implementation, options, position=None):
  loss = _loss(implementation, dict(options), position)
  return fast_jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def run_and_grad(implementation, qkv, gates, memory, omega=None, position=None, **options):
  """``(y, final state, grads)`` of a loss on y and the whole final state, one jit per case.

  ``position``: a state's position closed over as a constant (the kernel needs the chunk
  offset at trace time); ``memory`` then holds the state's float leaves.
  """
  fn = _grad_fn(implementation, tuple(sorted(options.items())), position)
  grads, (y, state) = fn(qkv, gates, memory, omega)
  return y, state, grads


def assert_trees_close(got, want, what, name):
  assert jax.tree.structure(got) == jax.tree.structure(want), name
  for (path, x), x_ref in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
  ):
    assert_close(x, x_ref, jnp.float32, what, f"{name}{jax.tree_util.keystr(path)}")


def check(platform, length, depth, chunk_size=16, grads=True, seed=0, **options):
  """The kernel (interpret mode) against the reference: y, final state and every gradient."""
  fmap = options.get("feature_map", "identity")
  qkv, gates, memory, omega = make_inputs(seed, length, depth, feature_map=fmap)
  options["chunk_size"] = chunk_size
  impl = f"pallas_{platform}"
  if grads:
    y, state, g = run_and_grad(impl, qkv, gates, memory, omega, **options)
    y_ref, state_ref, g_ref = run_and_grad("reference", qkv, gates, memory, omega, **options)
    assert_trees_close(g, g_ref, "grad", "d")
  else:
    y, state = run(impl, qkv, gates, memory, omega, **options)
    y_ref, state_ref = run("reference", qkv, gates, memory, omega, **options)
  assert y.shape == (B, length, H, V) and y.dtype == jnp.float32
  assert_close(y, y_ref, jnp.float32, "value", "y")
  assert_trees_close(state, state_ref, "value", "state")


def test_tpu_depth_two():
  # T = 40: two full chunks and a padded third; the padded tail must leave the state as is.
  check("tpu", 40, 2)


def test_gpu_depth_one():
  check("gpu", 24, 1)


def test_tpu_depth_one_chunk_8_ends_on_a_boundary():
  # T = 32 ends exactly on a chunk boundary: the next token opens a chunk at the final weights.
  check("tpu", 32, 1, chunk_size=8)


def test_gpu_depth_two_residual_gelu_forward():
  check("gpu", 20, 2, grads=False, residual=True, activation="gelu")


@pytest.mark.parametrize("depth, width", [(2, 64), (1, 32)])
def test_gpu_kernel_split_over_tiles(monkeypatch, depth, width):
  # A budget that only 16-wide tiles fit splits the hidden units (depth 2: 4 tiles of 64, so the
  # error is a sum over tiles and y accumulates over them) or the value columns (depth 1: 2
  # tiles of 32); values, final state and gradients (through the per-chunk states the kernel
  # saves tile by tile) against the reference, over a padded third chunk.
  value_dim = width if depth == 1 else V
  hidden = width if depth == 2 else None
  fits_16 = pallas_common.gpu_program_bytes(depth, 16, K, value_dim, hidden, 16)
  assert pallas_common.gpu_tile(depth, 16, K, value_dim, hidden) == width  # default: one tile
  monkeypatch.setattr(pallas_common, "GPU_PROGRAM_BUDGET", fits_16)
  assert pallas_common.gpu_tile(depth, 16, K, value_dim, hidden) == 16
  qkv, gates, memory, omega = make_inputs(3, 36, depth, value_dim=value_dim, hidden_dim=width)
  # Not through the cached jit of ``run_and_grad``: the tile is fixed while tracing.
  loss = _loss("pallas_gpu", {"chunk_size": 16})
  g, (y, state) = fast_jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
    qkv, gates, memory, omega
  )
  y_ref, state_ref, g_ref = run_and_grad("reference", qkv, gates, memory, omega, chunk_size=16)
  assert_close(y, y_ref, jnp.float32, "value", "y")
  assert_trees_close(state, state_ref, "value", "state")
  assert_trees_close(g, g_ref, "grad", "d")


def test_gpu_tiles_fit_the_budget():
  # Titans small/base (F = V = 64, hidden 128, C = 16) runs 4 hidden tiles of 32 per program;
  # too wide a memory for even 16-wide tiles is refused, so dispatch falls back to xla.
  assert pallas_common.gpu_tile(2, 16, 64, 64, 128) == 32
  assert pallas_common.gpu_program_bytes(2, 16, 64, 64, 128, 128) > (
    pallas_common.GPU_PROGRAM_BUDGET
  )
  assert pallas_common.gpu_tile(1, 16, 64, 64, None) == 64
  with pytest.raises(NotSupportedError, match="per program"):
    pallas_common.gpu_tile(2, 64, 1024, 1024, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("activation", ["silu", "relu", "tanh"])
def test_grid(platform, depth, activation):
  check(platform, 36, depth, activation=activation, residual=depth == 2)


@pytest.mark.slow
@pytest.mark.parametrize("platform, feature_map", [("tpu", "poly2"), ("gpu", "elu1")])
def test_feature_maps(platform, feature_map):
  # api.py applies the map before dispatch: the kernel sees F = 273 (poly2) or 16 (elu1).
  check(platform, 20, 2, grads=False, feature_map=feature_map)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_continues_a_state_mid_chunk(platform):
  # The second call starts 5 tokens into a chunk whose gradients are taken at the state's
  # chunk_start, not its current weights: values and gradients (wrt the state too) of the
  # continued call against the reference continuing the same state.
  qkv, gates, memory, omega = make_inputs(1, 29, 2)
  split = lambda tree, s: jax.tree.map(lambda x: x[:, s], tree)
  first, second = slice(0, 5), slice(5, None)
  head = (split(qkv, first), split(gates, first), memory, split(omega, first))
  _, state = run("xla", *head, chunk_size=16)
  position = int(state.pop("position"))
  args = (split(qkv, second), split(gates, second), state, split(omega, second))
  y, final, g = run_and_grad(f"pallas_{platform}", *args, position=position, chunk_size=16)
  y_ref, final_ref, g_ref = run_and_grad("reference", *args, position=position, chunk_size=16)
  assert int(final["position"]) == 29
  assert_close(y, y_ref, jnp.float32, "value", "y")
  assert_trees_close(final, final_ref, "value", "state")
  assert_trees_close(g, g_ref, "grad", "d")
  # Split == one call.
  y_whole, _ = run("reference", qkv, gates, memory, omega, chunk_size=16)
  assert_close(y, y_whole[:, 5:], jnp.float32, "value", "y vs one call")


def test_interpreters_poison_fresh_memory():
  # The NaN fill is what makes every comparison above a check that each output is written
  # (the generic interpreter, used for the GPU kernel, fills fresh buffers with NaN itself).
  cfg = pallas_common.Config(
    platform="tpu", chunk=8, offset=0, activation="silu", residual=False, interpret=True
  )
  assert pallas_common._interpret(cfg).uninitialized_memory == "nan"
  assert pallas_common._interpret(dataclasses.replace(cfg, platform="gpu")) is True


@pytest.mark.slow
def test_bf16_inputs():
  # api.py computes in float32 and casts y back: the kernel sees the same f32 values.
  qkv, gates, memory, _ = make_inputs(2, 20, 2)
  qkv = jax.tree.map(lambda x: x.astype(jnp.bfloat16), qkv)
  y, state = run("pallas_tpu", qkv, gates, memory, chunk_size=16)
  y_ref, state_ref = run("reference", qkv, gates, memory, chunk_size=16)
  assert y.dtype == jnp.bfloat16
  assert_close(y, y_ref, jnp.bfloat16, "value", "y")
  assert_trees_close(state, state_ref, "value", "state")


def test_unsupported_options_raise_and_fall_back():
  qkv, gates, memory, _ = make_inputs(0, 8, 1)
  call = lambda impl, **kw: neural_memory(
    *qkv, **gates, memory=memory, implementation=impl, interpret=True, **{"chunk_size": 8, **kw}
  )
  for kw, match in [
    ({"optimizer": "muon"}, "momentum"),
    ({"objective": "dot"}, "objective='l2'"),
    ({"omega_window": 2}, "omega_window"),
    ({"chunk_size": 4}, "chunk_size >= 8"),
    ({"self_targets": True}, "self_targets"),
  ]:
    with pytest.raises(NotSupportedError, match=match):
      call("pallas_tpu", **kw)
  with pytest.raises(NotSupportedError, match="powers of two"):
    call("pallas_gpu")  # C = 8 is below Triton's 16
  # A sequence of names falls back in order: Muon, the dot objective and self-generated
  # targets run on xla.
  for kw in ({"optimizer": "muon"}, {"objective": "dot"}, {"self_targets": True}):
    y, _ = call(("pallas_tpu", "xla"), **kw)
    y_xla, _ = call("xla", **kw)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_xla))


def test_traced_position_is_not_supported():
  # A state passed through jit has a traced position, so the chunk offset is unknown while
  # tracing; the kernel needs it static.
  qkv, gates, memory, _ = make_inputs(0, 8, 1)
  _, state = run("xla", qkv, gates, memory, chunk_size=8)

  @fast_jit
  def again(state):
    return neural_memory(*qkv, **gates, memory=state, chunk_size=8, implementation="pallas_tpu")

  with pytest.raises(NotSupportedError, match="traced position"):
    again(state)


def test_coefficients_match_the_xla_chunk():
  # The gate coefficients the kernel gets, against the definitions written out per entry.
  rng = np.random.default_rng(0)
  C = 8
  theta, eta, keep, gamma = (rng.uniform(0.1, 0.9, (1, 1, 1, C)) for _ in range(4))
  eta[..., 3] = 0.0  # exact zeros must stay exact (no ratios of cumulative products)
  valid = np.ones((1, 1, 1, C))
  valid[..., 6:] = 0.0
  theta[..., 6:] = 0.0
  arrays = [jnp.asarray(x, jnp.float32) for x in (theta, eta, keep, valid, gamma)]
  coef, vecs = pallas_common._coefficients(*arrays)
  t, e, a, m, g = (x[0, 0, 0] for x in (theta, eta, keep, valid, gamma))
  prod = lambda x, lo, hi: float(np.prod(x[lo:hi]))  # prod_{l=lo..hi-1}
  want = np.zeros((C, C))
  for i in range(C):
    for s in range(i + 1):
      # sum_m E^a[i,m] valid_m E^eta[m,s] theta_s gamma_s
      want[i, s] = sum(
        prod(a, mm + 1, i + 1) * m[mm] * prod(e, s + 1, mm + 1) for mm in range(s, i + 1)
      ) * (t[s] * g[s])
  np.testing.assert_allclose(np.asarray(coef[0, 0, 0]), want, atol=1e-6)
  cols = np.asarray(vecs[0, 0])
  np.testing.assert_allclose(cols[:, 0], np.cumprod(a), atol=1e-6)
  b = [
    sum(prod(a, mm + 1, i + 1) * m[mm] * prod(e, 0, mm + 1) for mm in range(i + 1))
    for i in range(C)
  ]
  np.testing.assert_allclose(cols[:, 1], b, atol=1e-6)
  np.testing.assert_allclose(cols[:, 2], np.cumprod(e), atol=1e-6)
  np.testing.assert_allclose(cols[:, 3], want[-1], atol=1e-6)
  mom = [prod(e, s + 1, C) * t[s] * g[s] for s in range(C)]
  np.testing.assert_allclose(cols[:, 4], mom, atol=1e-6)
  assert np.all(cols[:, 5:] == 0)


# Lowering at a realistic size: T=256, H=2, K=V=64, hidden 64, chunk 16, forward and backward.
_KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": r"__gpu\$xla\.gpu\.triton"}


@pytest.mark.parametrize("lowering_platform", ["tpu", "cuda"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("depth", [1, 2])
def test_lowers(lowering_platform, direction, depth):
  T, K_, V_, hidden = 256, 64, 64, 64
  f32 = jnp.float32
  spec = jax.ShapeDtypeStruct
  shapes = (
    spec((1, T, 2, K_), f32),
    spec((1, T, 2, K_), f32),
    spec((1, T, 2, V_), f32),
    {name: spec((1, T, 2), f32) for name in ("lr", "momentum", "decay")},
    {"w": spec((2, K_, V_), f32)}
    if depth == 1
    else {"w1": spec((2, K_, hidden), f32), "w2": spec((2, hidden, V_), f32)},
  )
  impl = "pallas_tpu" if lowering_platform == "tpu" else "pallas_gpu"

  def fwd(q, k, v, gates, memory):
    return neural_memory(
      q, k, v, **gates, memory=memory, chunk_size=16, implementation=impl, interpret=False
    )

  def loss(*args):
    y, state = fwd(*args)
    return jnp.sum(y**2) + sum(jnp.sum(w) for w in jax.tree.leaves(state["weights"]))

  f = fwd if direction == "fwd" else jax.grad(loss, argnums=(0, 1, 2, 3, 4))
  text = jax.jit(f).trace(*shapes).lower(lowering_platforms=(lowering_platform,)).as_text()
  # One kernel in both directions: the backward is xla's VJP (README: "Backward").
  assert len(re.findall(_KERNEL_CALL[lowering_platform], text)) == 1
