"""Every family trains one step through the simulated GPU and TPU dispatch with packed documents.

``MEMZOO_SIMULATE_BACKEND`` makes dispatch choose exactly as on that backend and run the Pallas
kernels in interpret mode here. The record of what served each op must show the platform's
kernel for every op that has one, unless the kernel declared (with ``NotSupportedError``) a
limit listed below; a refusal that was an error (a crash or a lowering failure) always fails.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ops.common
import zoo
from ops.common.dispatch import FAILED
from pipelines import config as config_lib
from pipelines.train.loop import IMPLEMENTATIONS_FILE, loss_fn, train

BACKENDS = ("gpu", "tpu")
# One family per op with kernels stays in the fast set (the neural memory's family takes over
# two minutes on 2 cores, so its op is checked directly below).
FAST = {("transformer", "gpu"), ("deltanet", "tpu")}
# XLA's CPU optimisation passes dominate a tiny step's time; the code paths are the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Limits a kernel may declare for a family's calls, by op.
_NEURAL_LIMITS = (
  "optimizer='momentum'",
  "objective='l2'",
  "omega_window=1",
  "self_targets",
  "powers of two",
  "chunk_size >= 8",
)
DECLARED_LIMITS = {
  "dot_product_attention": ("GPU blocks must be powers of two >= 16", "TPU blocks"),
  # The gated delta kernels serve every call a family makes, packed segments included.
  "gated_delta_rule": (),
  "neural_memory": _NEURAL_LIMITS,
}


def _packed_batch(vocab: int, batch: int = 2, length: int = 32):
  """Two documents per row (lengths 12 and 20), as the loader packs them."""
  rng = np.random.default_rng(0)
  inputs = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  segments = np.repeat(np.array([[0] * 12 + [1] * (length - 12)], np.int32), batch, 0)
  return {
    "inputs": inputs,
    "targets": np.roll(inputs, -1, axis=1),
    "segment_ids": segments,
    "loss_mask": (segments == np.roll(segments, -1, axis=1)).astype(np.float32),
  }


def _one_step(family: str, **overrides):
  """Loss and gradients of one packed batch, compiled once; returns (loss, grads)."""
  cfg = zoo.config(family, preset="tiny", **overrides)
  build = lambda: nnx.split(zoo.build(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  graphdef = build()[0]
  params, rest = jax.jit(lambda: build()[1:])()
  batch = _packed_batch(cfg.vocab_size)
  step = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(graphdef, p, rest, b)[0]))
  return step.lower(params, batch).compile(compiler_options=FAST_COMPILE)(params, batch)


def check_record(record: dict, backend: str) -> None:
  """Fails unless every op with a kernel was served by it or refused for a declared limit."""
  kernel = f"pallas_{backend}"
  for op, entry in record.items():
    if op not in DECLARED_LIMITS:
      continue
    reasons = entry["refused"].get(kernel, [])
    for reason in reasons:
      assert not reason.startswith(FAILED), f"{op}: {kernel} failed: {reason}"
      assert any(limit in reason for limit in DECLARED_LIMITS[op]), (
        f"{op}: {kernel} refused for an undeclared reason: {reason}"
      )
    if not reasons:
      assert entry["served"].get(kernel), f"{op} was not served by {kernel}: {entry}"
    # Whatever the kernel refused, the fallback served it.
    assert sum(entry["served"].values()) >= 1, entry


def _case(family, backend):
  marks = [] if (family, backend) in FAST else [pytest.mark.slow]
  return pytest.param(family, backend, marks=marks, id=f"{family}-{backend}")


@pytest.mark.parametrize(
  "family, backend", [_case(f, b) for f in zoo.list_models() for b in BACKENDS]
)
def test_family_trains_through_simulated_dispatch(family, backend, monkeypatch):
  monkeypatch.setenv(ops.common.SIMULATE_ENV, backend)
  ops.common.reset_served()
  # The fast cases keep one layer (every layer of these families calls the same ops).
  loss, grads = _one_step(family, **({"n_layers": 1} if (family, backend) in FAST else {}))
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  record = ops.common.served()
  check_record(record, backend)
  if family == "transformer":
    assert set(record["dot_product_attention"]["served"]) == {f"pallas_{backend}"}, record
  if family == "deltanet":
    assert set(record["gated_delta_rule"]["served"]) == {f"pallas_{backend}"}, record


def test_simulation_changes_the_choice_and_the_kernel_matches_xla(monkeypatch):
  """The same call picks xla on the CPU and the kernel (interpreted) under simulation."""
  import ops.attention as attention

  q = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 2, 16))
  segments = jnp.asarray(np.array([[0] * 10 + [1] * 22], np.int32))
  # A fresh jit per backend: a traced step keeps the choice made when it was traced.
  call = lambda q: attention.dot_product_attention(q, q, q, segment_ids=(segments, segments))
  ops.common.reset_served()
  o_cpu = jax.jit(call)(q)
  assert ops.common.served()["dot_product_attention"]["served"] == {"xla": 1}
  monkeypatch.setenv(ops.common.SIMULATE_ENV, "gpu")
  ops.common.reset_served()
  o_gpu = jax.jit(lambda q: call(q))(q)
  assert ops.common.served()["dot_product_attention"]["served"] == {"pallas_gpu": 1}
  np.testing.assert_allclose(np.asarray(o_gpu), np.asarray(o_cpu), atol=2e-6)


def test_neural_memory_kernel_serves_under_simulated_tpu(monkeypatch):
  import ops.memory as memory

  key = jax.random.split(jax.random.PRNGKey(1), 7)
  q, k, v = (jax.random.normal(key[i], (1, 16, 2, 16)) * 0.5 for i in range(3))
  gates = {n: jax.nn.sigmoid(jax.random.normal(key[3 + i], (1, 16, 2))) * 0.5
           for i, n in enumerate(("lr", "momentum", "decay"))}  # fmt: skip
  weights = memory.init_memory(key[6], heads=2, key_dim=16, value_dim=16)
  call = lambda q: memory.neural_memory(q, k, v, **gates, memory=weights, chunk_size=8)[0]
  ops.common.reset_served()
  y_cpu = jax.jit(call)(q)
  monkeypatch.setenv(ops.common.SIMULATE_ENV, "tpu")
  y_tpu = jax.jit(lambda q: call(q))(q)
  assert ops.common.served()["neural_memory"]["served"] == {"xla": 1, "pallas_tpu": 1}
  np.testing.assert_allclose(np.asarray(y_tpu), np.asarray(y_cpu), atol=1e-5)


def test_bad_simulated_backend_is_one_clear_error(monkeypatch):
  monkeypatch.setenv(ops.common.SIMULATE_ENV, "quantum")
  with pytest.raises(ValueError, match=re.escape("MEMZOO_SIMULATE_BACKEND='quantum'")):
    ops.common.backend()


@pytest.mark.slow
def test_train_run_records_the_served_kernels(tmp_path, monkeypatch):
  monkeypatch.setenv(ops.common.SIMULATE_ENV, "gpu")
  exp = config_lib.from_dict(
    {
      "model": {"name": "transformer", "preset": "tiny", "n_layers": 1},
      "data": {"source": "stdlib", "max_documents": 20, "seq_len": 32, "batch_size": 2},
      "mesh": {"data": 1},
      "train": {
        "steps": 1,
        "warmup_steps": 0,
        "eval_every": 0,
        "checkpoint_every": 1,
        "async_checkpoint": False,
        "progress": False,
      },
      "run_dir": str(tmp_path / "run"),
    }
  )
  train(exp)
  record = json.loads((tmp_path / "run" / IMPLEMENTATIONS_FILE).read_text())
  assert record["backend"] == "gpu"
  assert record["ops"]["dot_product_attention"]["served"] == {"pallas_gpu": 1}


# Families whose training forward calls no op of ``ops`` (a form the op cannot express).
TRAINS_WITHOUT_OPS = {
  # The grouped softmax (each block's landmark gates that block's keys inside one softmax over
  # all blocks) is not an attention mask; its training forward is XLA. Decode retrieves
  # through ops.attention's block_indices.
  "landmark",
}


def _trace_step(family: str) -> None:
  """Traces loss and gradients of one packed batch (no compile): dispatch chooses, and under a
  simulated backend lowers each kernel for that platform, while the step is traced."""
  cfg = zoo.config(family, preset="tiny")
  graphdef, params, rest = nnx.split(zoo.build(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  batch = _packed_batch(cfg.vocab_size)
  jax.eval_shape(jax.value_and_grad(lambda p, b: loss_fn(graphdef, p, rest, b)[0]), params, batch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", zoo.list_models())
def test_every_family_is_served_by_the_platform_kernels(family, backend, monkeypatch):
  # The fast form of the test above for every family: the packed train step is traced as on
  # the accelerator, so every op call is offered to the platform's kernel, which must serve it
  # (or refuse for a declared limit) and lower for the real platform (Triton / Mosaic), not the
  # interpreter; running the step in interpret mode is the slow test above.
  monkeypatch.setenv(ops.common.SIMULATE_ENV, backend)
  ops.common.reset_served()
  _trace_step(family)
  record = ops.common.served()
  if family in TRAINS_WITHOUT_OPS:
    assert not record, record  # if it starts calling an op, the op must serve it (remove it)
    return
  assert record, "no op was dispatched"
  check_record(record, backend)
