"""Sequence-parallel gated delta rule on 8 fake CPU devices vs the unsharded op."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.memory import gated_delta_rule_context_parallel
from ops.memory.gated_delta.api import gated_delta_rule
from tests.ops.test_gated_delta import make_inputs

# Same f32 sums as the unsharded chunked op, grouped by shard: tight (atol, rtol).
TOLERANCES = {"out": (1e-4, 1e-4), "grad": (5e-4, 5e-4)}


def _close(a, b, kind, what=""):
  atol, rtol = TOLERANCES[kind]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol, err_msg=what)


@pytest.fixture(scope="module")
def mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
  return jax.make_mesh((2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize(
  "gate,beta,init,segments",
  [("channel", True, True, False), ("scalar", False, False, False), ("scalar", True, True, True)],
)
def test_sharded_equals_unsharded_values_and_grads(mesh, gate, beta, init, segments):
  x = make_inputs(2, 64, 2, 8, 4, gate=gate, beta=beta, init=init, seed=11)
  # Segment starts inside a shard, exactly on a shard boundary (t=16) and in the next shard.
  ids = jnp.array([[0] * 5 + [1] * 11 + [2] * 30 + [3] * 18, [7] * 64]) if segments else None
  names = [n for n in ("q", "k", "v", "g", "beta", "s0") if x[n] is not None]

  def call(fn, args, **kw):
    y = {**x, **dict(zip(names, args))}
    return fn(
      y["q"],
      y["k"],
      y["v"],
      g=y["g"],
      beta=y["beta"],
      initial_state=y["s0"],
      output_final_state=True,
      chunk_size=8,
      segment_ids=ids,
      **kw,
    )

  sharded = lambda args: call(gated_delta_rule_context_parallel, args, mesh=mesh, batch_axis="data")
  plain = lambda args: call(gated_delta_rule, args)
  args = [x[n] for n in names]
  o, s = jax.jit(sharded)(args)
  o_ref, s_ref = plain(args)
  _close(o, o_ref, "out")
  _close(s, s_ref, "out")

  loss = lambda fn: lambda a: jnp.sum(jnp.sin(fn(a)[0])) + jnp.sum(fn(a)[1] ** 2)
  grads = jax.jit(jax.grad(loss(sharded)))(args)
  grads_ref = jax.grad(loss(plain))(args)
  for n, d, d_ref in zip(names, grads, grads_ref):
    _close(d, d_ref, "grad", what=f"d{n}")


def test_sharded_rejects_uneven_time(mesh):
  x = make_inputs(2, 30, 2, 8, 4, seed=12)
  with pytest.raises(ValueError, match="divide evenly"):
    gated_delta_rule_context_parallel(x["q"], x["k"], x["v"], mesh=mesh)


def test_sharded_on_explicit_mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh(
    (2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Explicit,) * 2
  )
  x = make_inputs(2, 32, 2, 8, 4, gate="scalar", beta=False, seed=13)
  kw = dict(g=x["g"], initial_state=x["s0"], output_final_state=True, chunk_size=8)
  with jax.set_mesh(mesh):
    o, s = jax.jit(
      lambda q, k, v: gated_delta_rule_context_parallel(q, k, v, mesh=mesh, batch_axis="data", **kw)
    )(x["q"], x["k"], x["v"])
  o_ref, s_ref = gated_delta_rule(x["q"], x["k"], x["v"], **kw)
  _close(o, o_ref, "out")
  _close(s, s_ref, "out")
