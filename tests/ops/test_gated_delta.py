"""Tests for ops.memory.gated_delta: references, the xla implementation, decode, packing, prefix.

``GatedDeltaConformance`` is the conformance suite of one implementation against the step
recurrence (the definition); subclass it with another ``implementation`` to test a kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.common.dispatch import NotSupportedError
from ops.memory.gated_delta import api, reference
from ops.memory.gated_delta.api import gated_delta_rule, gated_delta_rule_step

# (atol, rtol) by what is compared. f32: both sides accumulate in f32 but sum in different orders
# (chunk matmuls and a triangular solve vs one token at a time). bf16: the output is rounded to
# bf16 (8 significant bits), so ~2^-8 relative plus inputs rounded the same on both sides.
TOLERANCES = {
  "f32_out": (1e-4, 1e-4),
  "f32_state": (1e-4, 1e-4),
  # Gradients sum over T tokens and chunks; 500-token sums in a different order drift more.
  "f32_grad": (5e-4, 5e-4),
  "bf16_out": (2e-2, 2e-2),
  "bf16_state": (1e-4, 1e-4),
}


def _assert_close(actual, expected, kind, what=""):
  atol, rtol = TOLERANCES[kind]
  np.testing.assert_allclose(
    np.asarray(actual, np.float32),
    np.asarray(expected, np.float32),
    atol=atol,
    rtol=rtol,
    err_msg=what,
  )


def make_inputs(B, T, H, K, V, *, dtype=jnp.float32, gate="scalar", beta=True, init=True, seed=0):
  """Random inputs in the ranges the models use (unit-norm keys keep the delta rule stable)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], (B, T, H, K))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (B, T, H, V))
  g = None
  if gate == "scalar":
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)) - 2.0)
  elif gate == "channel":
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)) - 2.0)
  b = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))) if beta else None
  s0 = jax.random.normal(ks[5], (B, H, K, V)) * 0.5 if init else None
  return dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype), g=g, beta=b, s0=s0)


def run_reference(x, scale=None, segment_ids=None):
  K = x["q"].shape[-1]
  return reference.recurrent_gated_delta_rule(
    x["q"],
    x["k"],
    x["v"],
    x["g"],
    x["beta"],
    scale=K**-0.5 if scale is None else scale,
    initial_state=x["s0"],
    segment_ids=segment_ids,
  )


GATES = ("none", "scalar", "channel")


@pytest.mark.parametrize("gate,beta", [("none", False), ("scalar", True), ("channel", True)])
def test_chunked_reference_matches_recurrent(gate, beta):
  x = make_inputs(2, 63, 2, 8, 6, gate=gate, beta=beta, seed=1)
  o_ref, s_ref = run_reference(x)
  o, s = reference.chunk_gated_delta_rule(
    x["q"],
    x["k"],
    x["v"],
    x["g"],
    x["beta"],
    scale=8**-0.5,
    initial_state=x["s0"],
    chunk_size=16,
  )
  _assert_close(o, o_ref, "f32_out")
  _assert_close(s, s_ref, "f32_state")


# (B, T, H, K, V, chunk, dtype, gate, beta, init): every T, chunk, gate and write kind appears.
FORWARD_CASES = [
  (1, 1, 2, 16, 16, 16, jnp.float32, "scalar", True, True),
  (2, 63, 2, 16, 8, 16, jnp.float32, "none", False, True),
  (2, 63, 2, 8, 16, 32, jnp.float32, "scalar", False, False),
  (2, 63, 2, 16, 16, 64, jnp.float32, "channel", False, True),
  (2, 63, 2, 8, 16, 32, jnp.float32, "scalar", True, True),
  (2, 63, 2, 16, 16, 64, jnp.float32, "channel", True, True),
  (1, 500, 2, 32, 16, 64, jnp.float32, "scalar", True, True),
  (1, 500, 1, 16, 32, 32, jnp.float32, "channel", True, False),
  (2, 63, 2, 16, 16, 16, jnp.bfloat16, "scalar", True, True),
  (1, 500, 2, 16, 16, 64, jnp.bfloat16, "channel", False, True),
]

# (T, chunk, gate, beta, init) for gradients of every input.
GRAD_CASES = [
  (1, 16, "scalar", True, True),
  (63, 16, "scalar", True, True),
  (63, 32, "channel", True, True),
  (63, 64, "none", False, True),
  pytest.param(63, 16, "channel", False, True, marks=pytest.mark.slow),
  pytest.param(500, 64, "scalar", True, True, marks=pytest.mark.slow),
]


class GatedDeltaConformance:
  """Outputs, final states and gradients of one implementation vs the step recurrence."""

  implementation = "xla"
  interpret = None

  def run(self, x, chunk_size, **kwargs):
    return gated_delta_rule(
      x["q"],
      x["k"],
      x["v"],
      g=x["g"],
      beta=x["beta"],
      initial_state=x["s0"],
      output_final_state=True,
      chunk_size=chunk_size,
      implementation=self.implementation,
      interpret=self.interpret,
      **kwargs,
    )

  @pytest.mark.parametrize("B,T,H,K,V,chunk,dtype,gate,beta,init", FORWARD_CASES)
  def test_forward(self, B, T, H, K, V, chunk, dtype, gate, beta, init):
    x = make_inputs(B, T, H, K, V, dtype=dtype, gate=gate, beta=beta, init=init, seed=T + K)
    o, s = self.run(x, chunk)
    o_ref, s_ref = run_reference(x)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert s.dtype == jnp.float32 and s.shape == (B, H, K, V)
    name = "bf16" if dtype == jnp.bfloat16 else "f32"
    _assert_close(o, o_ref, f"{name}_out")
    _assert_close(s, s_ref, f"{name}_state")

  @pytest.mark.parametrize("T,chunk,gate,beta,init", GRAD_CASES)
  def test_gradients(self, T, chunk, gate, beta, init):
    x = make_inputs(1, T, 2, 8, 8, gate=gate, beta=beta, init=init, seed=T)
    names = [n for n in ("q", "k", "v", "g", "beta", "s0") if x[n] is not None]
    wo = jax.random.normal(jax.random.PRNGKey(7), x["v"].shape)
    ws = jax.random.normal(jax.random.PRNGKey(8), (1, 2, 8, 8))

    def loss(fn, args):
      o, s = fn({**x, **dict(zip(names, args))})
      return jnp.sum(o * wo) + jnp.sum(s * ws)

    args = [x[n] for n in names]
    grads = jax.jit(jax.grad(lambda a: loss(lambda y: self.run(y, chunk), a)))(args)
    grads_ref = jax.jit(jax.grad(lambda a: loss(run_reference, a)))(args)
    for n, d, d_ref in zip(names, grads, grads_ref):
      assert np.all(np.isfinite(np.asarray(d))), n
      _assert_close(d, d_ref, "f32_grad", what=f"d{n}")


class TestXla(GatedDeltaConformance):
  implementation = "xla"


class TestReferenceChunked(GatedDeltaConformance):
  """The chunked reference through the public api (padding, dispatch), forward only."""

  implementation = "reference_chunked"
  pytestmark = pytest.mark.slow
  test_gradients = None


def test_default_implementation_on_cpu_is_xla():
  x = make_inputs(1, 40, 2, 8, 8, seed=3)
  kw = dict(g=x["g"], beta=x["beta"], initial_state=x["s0"], chunk_size=16)
  o, _ = gated_delta_rule(x["q"], x["k"], x["v"], **kw)
  o_xla, _ = gated_delta_rule(x["q"], x["k"], x["v"], implementation="xla", **kw)
  np.testing.assert_array_equal(np.asarray(o), np.asarray(o_xla))


def test_runs_under_jit():
  x = make_inputs(1, 40, 2, 8, 8, gate="channel", seed=4)
  f = jax.jit(
    lambda q, k, v, g, b, s: gated_delta_rule(
      q, k, v, g=g, beta=b, initial_state=s, output_final_state=True, chunk_size=16
    )
  )
  o, s = f(x["q"], x["k"], x["v"], x["g"], x["beta"], x["s0"])
  o_ref, s_ref = run_reference(x)
  _assert_close(o, o_ref, "f32_out")
  _assert_close(s, s_ref, "f32_state")


@pytest.mark.parametrize("gate,beta", [("none", False), ("scalar", True), ("channel", True)])
def test_step_decode_equals_full_op(gate, beta):
  x = make_inputs(2, 21, 2, 8, 4, gate=gate, beta=beta, seed=5)
  o_full, s_full = gated_delta_rule(
    x["q"],
    x["k"],
    x["v"],
    g=x["g"],
    beta=x["beta"],
    initial_state=x["s0"],
    output_final_state=True,
    chunk_size=8,
  )
  state, outs = x["s0"], []
  at = lambda a, t: None if a is None else a[:, t]
  for t in range(21):
    o, state = gated_delta_rule_step(
      at(x["q"], t),
      at(x["k"], t),
      at(x["v"], t),
      g=at(x["g"], t),
      beta=at(x["beta"], t),
      state=state,
    )
    outs.append(o)
  _assert_close(jnp.stack(outs, axis=1), o_full, "f32_out")
  _assert_close(state, s_full, "f32_state")


@pytest.mark.parametrize("gate,beta", [("scalar", True), ("channel", False)])
def test_packed_segments_equal_separate_calls(gate, beta):
  lengths = [5, 23, 1, 34]  # crosses chunk boundaries; a chunk holds several segment starts
  T = sum(lengths)
  x = make_inputs(1, T, 2, 8, 4, gate=gate, beta=beta, seed=6)
  ids = jnp.concatenate([jnp.full((n,), 10 + i) for i, n in enumerate(lengths)])[None]
  o, s = gated_delta_rule(
    x["q"],
    x["k"],
    x["v"],
    g=x["g"],
    beta=x["beta"],
    initial_state=x["s0"],
    output_final_state=True,
    chunk_size=16,
    segment_ids=ids,
  )
  start = 0
  for i, n in enumerate(lengths):
    part = lambda a, start=start, n=n: None if a is None else a[:, start : start + n]
    o_i, s_i = gated_delta_rule(
      part(x["q"]),
      part(x["k"]),
      part(x["v"]),
      g=part(x["g"]),
      beta=part(x["beta"]),
      initial_state=x["s0"] if i == 0 else None,
      output_final_state=True,
      chunk_size=16,
    )
    _assert_close(o[:, start : start + n], o_i, "f32_out", what=f"segment {i}")
    start += n
  _assert_close(s, s_i, "f32_state")


def test_packed_segments_gradients_match_reference():
  x = make_inputs(2, 50, 2, 8, 4, gate="channel", beta=True, seed=7)
  ids = jnp.array([[0] * 17 + [1] * 33, [3] * 30 + [4] * 20])

  def loss(fn, q, k, v, g, b, s0):
    o, s = fn(dict(q=q, k=k, v=v, g=g, beta=b, s0=s0))
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(s**2)

  xla_fn = lambda y: gated_delta_rule(
    y["q"],
    y["k"],
    y["v"],
    g=y["g"],
    beta=y["beta"],
    initial_state=y["s0"],
    output_final_state=True,
    chunk_size=16,
    segment_ids=ids,
  )
  ref_fn = lambda y: run_reference(y, segment_ids=ids)
  args = [x[n] for n in ("q", "k", "v", "g", "beta", "s0")]
  grads = jax.jit(jax.grad(lambda *a: loss(xla_fn, *a), argnums=tuple(range(6))))(*args)
  grads_ref = jax.jit(jax.grad(lambda *a: loss(ref_fn, *a), argnums=tuple(range(6))))(*args)
  for d, d_ref in zip(grads, grads_ref):
    _assert_close(d, d_ref, "f32_grad")


def prefix_quadratic(q, k, v, g, s0, P, scale):
  """Prefix mode written as masked attention: token t reads keys j <= max(t, P - 1)."""
  B, T, H, K = q.shape
  G = jnp.cumsum(g, axis=1) if g is not None else jnp.zeros((B, T, H, K))
  G = jnp.broadcast_to(G[..., None], (B, T, H, K)) if G.ndim == 3 else G
  t = jnp.arange(T)
  end = jnp.maximum(t, P - 1)  # the token whose state t reads
  G_end = G[:, end]  # [B,T,H,K]
  visible = t[None, :] <= end[:, None]  # [t, j]
  decay = jnp.exp(
    jnp.where(visible[None, :, :, None, None], G_end[:, :, None] - G[:, None], -jnp.inf)
  )
  scores = jnp.einsum("bthk,bjhk,btjhk->bhtj", q, k, decay)
  o = jnp.einsum("bhtj,bjhv->bthv", scores, v)
  o = o + jnp.einsum("bthk,bhkv->bthv", q * jnp.exp(G_end), s0)
  return scale * o


@pytest.mark.parametrize("gate,P", [("none", 20), ("scalar", 1), ("scalar", 45), ("channel", 20)])
def test_prefix_mode_matches_masked_attention(gate, P):
  x = make_inputs(1, 45, 2, 8, 4, gate=gate, beta=False, seed=8)
  f = lambda q, k, v, g, s0: gated_delta_rule(
    q, k, v, g=g, initial_state=s0, output_final_state=True, chunk_size=16, prefix_len=P
  )
  o, s = f(x["q"], x["k"], x["v"], x["g"], x["s0"])
  o_ref = prefix_quadratic(x["q"], x["k"], x["v"], x["g"], x["s0"], P, 8**-0.5)
  _assert_close(o, o_ref, "f32_out")
  _, s_causal = run_reference(x)  # the final state does not depend on the read pattern
  _assert_close(s, s_causal, "f32_state")
  if gate == "channel" and P == 20:
    names = ("q", "k", "v", "g", "s0")
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)[0] if fn is f else fn(*a)))
    ref = lambda q, k, v, g, s0: prefix_quadratic(q, k, v, g, s0, P, 8**-0.5)
    args = [x[n] for n in names]
    grads = jax.grad(loss(f), argnums=tuple(range(5)))(*args)
    grads_ref = jax.grad(loss(ref), argnums=tuple(range(5)))(*args)
    for n, d, d_ref in zip(names, grads, grads_ref):
      _assert_close(d, d_ref, "f32_grad", what=f"d{n}")


def _call(x, **kwargs):
  kw = dict(g=x["g"], beta=x["beta"], initial_state=x["s0"])
  kw.update(kwargs)
  return gated_delta_rule(x["q"], x["k"], x["v"], **kw)


@pytest.mark.parametrize(
  "change,message",
  [
    (dict(k=jnp.zeros((1, 9, 2, 3))), "k must have"),
    (dict(v=jnp.zeros((1, 9, 3, 4))), "v must be"),
    (dict(q=jnp.zeros((9, 2, 4))), "ranks"),
    (dict(g=jnp.zeros((1, 9, 2, 3))), "g must be"),
    (dict(g=jnp.full((1, 9, 2), 0.1)), "must be <= 0"),
    (dict(beta=jnp.full((1, 9, 2), 1.5)), r"beta must lie in \[0, 1\]"),
    (dict(beta=jnp.full((1, 9), 0.5)), "beta must be"),
    (dict(initial_state=jnp.zeros((1, 2, 4, 5))), "initial_state must be"),
    (dict(chunk_size=48), "power of two"),
    (dict(segment_ids=jnp.zeros((1, 8), jnp.int32)), "segment_ids"),
    (dict(prefix_len=4), "additive writes only"),
    (dict(prefix_len=10, beta=None), "prefix_len must be"),
    (dict(implementation="nope"), "unknown implementation"),
  ],
)
def test_bad_input_raises(change, message):
  x = make_inputs(1, 9, 2, 4, 4, seed=9)
  x.update({n: change.pop(n) for n in ("q", "k", "v") if n in change})
  for n, key in (("g", "g"), ("beta", "beta"), ("initial_state", "s0")):
    if n in change:
      x[key] = change.pop(n)
  with pytest.raises(ValueError, match=message):
    _call(x, **change)


def test_named_implementation_that_cannot_serve_raises():
  x = make_inputs(1, 9, 2, 4, 4, seed=9)
  with pytest.raises(NotSupportedError, match="segment_ids"):
    _call(x, implementation="reference_chunked", segment_ids=jnp.zeros((1, 9), jnp.int32))


def test_step_validates():
  q = jnp.zeros((1, 2, 4))
  with pytest.raises(ValueError, match="must be <= 0"):
    gated_delta_rule_step(q, q, q, g=jnp.ones((1, 2)), state=jnp.zeros((1, 2, 4, 4)))
  with pytest.raises(ValueError, match="state must be"):
    gated_delta_rule_step(q, q, q, state=jnp.zeros((1, 2, 4, 3)))


def test_xla_memory_is_linear_in_time():
  """Temp memory of forward+backward grows ~linearly in T (quadratic would be 16x for 4x T)."""

  def temp_bytes(T):
    x = make_inputs(1, T, 2, 16, 16, gate="scalar", seed=10)
    f = jax.jit(
      jax.grad(
        lambda q, k, v, g, b: jnp.sum(
          gated_delta_rule(q, k, v, g=g, beta=b, chunk_size=64, implementation="xla")[0]
        ),
        argnums=(0, 1, 2, 3, 4),
      )
    )
    stats = f.lower(x["q"], x["k"], x["v"], x["g"], x["beta"]).compile().memory_analysis()
    if stats is None:
      pytest.skip("no memory analysis on this backend")
    return stats.temp_size_in_bytes

  small, large = temp_bytes(1024), temp_bytes(4096)
  assert large < 6 * small, (small, large)


def test_implementations_table_is_complete():
  assert {"xla", "reference", "reference_chunked", "pallas_tpu", "pallas_gpu"} <= set(
    api.IMPLEMENTATIONS
  )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_xla_forward_and_backward_lower_for_accelerators(platform):
  """The xla path serves what kernels cannot (packed segments) on TPU and GPU too."""
  x = make_inputs(1, 128, 2, 16, 16, gate="channel", beta=True, seed=14)
  ids = jnp.array([[0] * 50 + [1] * 78])

  def loss(q, k, v, g, b, s0):
    o, s = gated_delta_rule(
      q,
      k,
      v,
      g=g,
      beta=b,
      initial_state=s0,
      output_final_state=True,
      chunk_size=64,
      segment_ids=ids,
      implementation="xla",
    )
    return jnp.sum(o) + jnp.sum(s)

  f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))
  args = [x[n] for n in ("q", "k", "v", "g", "beta", "s0")]
  text = f.trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert "stablehlo" in text
