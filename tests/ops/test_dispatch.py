"""Dispatch: fallback order, refusals logged once and recorded, lowering for another platform."""

import importlib
import logging
import re

import jax
import numpy as np
import pytest

import ops.common
from ops.attention import Mask, dot_product_attention
from ops.common import NotSupportedError

dispatch_module = importlib.import_module("ops.common.dispatch")

Q = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 2, 16))


def call(**kw):
  return dot_product_attention(Q, Q, Q, mask=Mask(), **kw)


def test_interpret_none_lowers_the_kernel_for_cuda_from_a_cpu_host():
  f = jax.jit(lambda q: dot_product_attention(q, q, q, implementation="pallas_gpu"))
  cuda = f.trace(Q).lower(lowering_platforms=("cuda",)).as_text()
  cpu = f.trace(Q).lower(lowering_platforms=("cpu",)).as_text()
  assert "__gpu$xla.gpu.triton" in cuda  # the Triton kernel, not the interpreter
  assert "triton" not in cpu  # on the host itself the interpreter runs
  tpu = jax.jit(lambda q: dot_product_attention(q, q, q, implementation="pallas_tpu"))
  assert "tpu_custom_call" in tpu.trace(Q).lower(lowering_platforms=("tpu",)).as_text()


def test_a_lowering_failure_refuses_and_falls_back_logged_once(monkeypatch, caplog):
  """Under the simulated GPU a kernel that fails to lower yields to xla; a named one raises."""
  monkeypatch.setenv(ops.common.SIMULATE_ENV, "gpu")
  monkeypatch.setattr(dispatch_module, "_trials", {})

  def broken(*args, **kwargs):
    raise RuntimeError("triton: out of shared memory")

  monkeypatch.setattr(dispatch_module, "_trial_lower", broken)
  ops.common.reset_served()
  with caplog.at_level(logging.WARNING, logger="ops.dispatch"):
    o1 = jax.jit(lambda q: call())(Q)
    o2 = jax.jit(lambda q: call(scale=0.3) * 0 + call())(Q)  # the same refusal again
  record = ops.common.served()["dot_product_attention"]
  assert record["served"] == {"xla": 3}
  (reason,) = record["refused"]["pallas_gpu"]
  assert reason.startswith(dispatch_module.FAILED) and "out of shared memory" in reason
  assert len([r for r in caplog.records if "pallas_gpu" in r.getMessage()]) == 1
  np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
  with pytest.raises(NotSupportedError, match="out of shared memory"):
    call(implementation="pallas_gpu")
  with pytest.raises(NotSupportedError, match=re.escape("pallas_gpu: failed: does not lower")):
    call(implementation=("pallas_gpu",))


def test_without_simulation_the_cpu_never_tries_the_kernel(monkeypatch):
  monkeypatch.setattr(dispatch_module, "_trials", {})
  monkeypatch.setattr(dispatch_module, "_trial_lower", None)  # would fail if it were called
  ops.common.reset_served()
  call()
  assert ops.common.served()["dot_product_attention"] == {"served": {"xla": 1}, "refused": {}}


def test_a_sequence_reports_every_failure():
  table = {"a": _impl("refuse_a"), "b": _impl("refuse_b"), "c": _impl("serve_c")}
  with pytest.raises(NotSupportedError) as e:
    ops.common.dispatch("op", table, ("a", "b"), {}, Q)
  assert "a: no a" in str(e.value) and "b: no b" in str(e.value)
  assert ops.common.dispatch("op", table, ("a", "c"), {}, Q) == "c"
  with pytest.raises(NotSupportedError, match="implementation 'a' cannot serve this call: no a"):
    ops.common.dispatch("op", table, "a", {"cpu": ("a", "c")}, Q)
  assert ops.common.dispatch("op", table, None, {"cpu": ("a", "c")}, Q) == "c"


def _impl(name):
  return ops.common.Implementation(__name__, name)


def refuse_a(*args, interpret=False):
  raise NotSupportedError("no a")


def refuse_b(*args, interpret=False):
  raise NotSupportedError("no b")


def serve_c(*args, interpret=False):
  return "c"
