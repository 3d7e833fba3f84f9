"""Context parallelism in the models: on 8 fake CPU devices, a training step on a mesh with a
``context`` axis runs ring attention / the sequence-parallel memory and equals one device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipelines import config as config_lib
from pipelines import sharding
from pipelines.run import build_model
from pipelines.train.loop import make_train_step
from zoo.layers import parallel
from zoo.layers.attention import Attention

# float32; the ring merges partial softmaxes by their lse and the sequence-parallel memory
# composes per-shard state maps, so sums run in a different order than on one device. Params are
# compared after an SGD step (Adam's first step, lr * g / |g|, would amplify that noise).
TOL = {"loss": 1e-5, "params": 5e-5}
SGD_LR = 0.5
SEQ = 16  # a multiple of 2 x context: the ring's load-balanced layout gives each device 2 chunks

TRANSFORMER = {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64}
MODELS = {
  "transformer": TRANSFORMER,
  # Primer's q/k/v convolutions run outside the ring, on the context-split sequence: their taps
  # must reach across shard boundaries (and stop at document starts) as on one device.
  "primer": {**TRANSFORMER, "conv_width": 3},
  "deltanet": {
    "name": "deltanet",
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "d_ff": 64,
    "chunk_size": 4,
  },
}
MESHES = {
  "fsdp=2,context=4": {"data": 1, "fsdp": 2, "context": 4},
  "data=2,context=4": {"data": 2, "context": 4},
}
# Each mesh compiles its own step (~15 s of one core); data=2 differs from fsdp=2 only in the
# name of the batch axis inside the same code path, so it runs in the slow set.
SLOW = {"data=2,context=4"}


def experiment(model: str, mesh: dict):
  raw = {
    "model": {"preset": "tiny", **MODELS[model]},
    "data": {"seq_len": SEQ, "batch_size": 4},
    "train": {"lr": 1e-2, "warmup_steps": 0, "progress": False},
    "mesh": mesh,
    "run_dir": "unused",
  }
  return config_lib.from_dict(raw)


def batch(seed=0, b=4, t=SEQ, vocab=260):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[:, 5:] = 2  # a document boundary inside the first context shard, another in the third
  seg[:, 11:] = 3
  return {
    "inputs": toks[:, :-1],
    "targets": toks[:, 1:],
    "segment_ids": seg,
    "loss_mask": np.ones((b, t), np.float32),
  }


def one_step(model: str, mesh_cfg: dict | None):
  """(loss, params, compiled HLO text or None) after one SGD step."""
  exp = experiment(model, mesh_cfg or {"data": 1})
  graphdef, params, rest = build_model(exp)
  tx = optax.sgd(SGD_LR)
  if mesh_cfg is None:
    step = make_train_step(graphdef, rest, tx, exp.train)
    new, _, metrics = step(params, tx.init(params), batch())
    return float(metrics["loss"]), [np.asarray(x) for x in jax.tree.leaves(new)], None
  mesh = sharding.make_mesh(exp.mesh)
  params = sharding.shard_params(params, mesh)
  opt = sharding.place_state(tx.init(params), mesh)
  step = make_train_step(graphdef, rest, tx, exp.train, mesh)
  placed = sharding.shard_batch(batch(), mesh)
  compiled = step.lower(params, opt, placed).compile()  # run the very executable inspected
  new, _, metrics = compiled(params, opt, placed)
  hlo = compiled.as_text()
  return float(metrics["loss"]), [np.asarray(x) for x in jax.tree.leaves(new)], hlo


@pytest.fixture(scope="module")
def reference():
  return {m: one_step(m, None) for m in MODELS}


def spy(monkeypatch, name):
  """Counts trace-time calls of ``zoo.layers.parallel.<name>``."""
  calls = []
  real = getattr(parallel, name) if name != "ring_attention" else parallel.attn_ops.ring_attention

  def wrapped(*args, **kwargs):
    calls.append(kwargs.get("mesh"))
    return real(*args, **kwargs)

  if name == "ring_attention":
    monkeypatch.setattr(parallel.attn_ops, "ring_attention", wrapped)
  else:
    monkeypatch.setattr(parallel, name, wrapped)
  return calls


@pytest.mark.parametrize(
  "mesh", [pytest.param(k, marks=[pytest.mark.slow] if k in SLOW else []) for k in MESHES]
)
@pytest.mark.parametrize("model", list(MODELS))
def test_context_step_matches_one_device(model, mesh, reference, monkeypatch):
  attention = model in ("transformer", "primer")
  kernel = "ring_attention" if attention else "gated_delta_rule_context_parallel"
  calls = spy(monkeypatch, kernel)
  loss, params, hlo = one_step(model, MESHES[mesh])
  assert calls and all(m.shape["context"] == 4 for m in calls), f"{kernel} was not used"
  ref_loss, ref_params, _ = reference[model]
  initial = [np.asarray(x) for x in jax.tree.leaves(build_model(experiment(model, {}))[1])]
  assert max(np.abs(a - b).max() for a, b in zip(ref_params, initial)) > 100 * TOL["params"]
  np.testing.assert_allclose(loss, ref_loss, rtol=TOL["loss"])
  for a, b in zip(params, ref_params):
    np.testing.assert_allclose(a, b, atol=TOL["params"], rtol=TOL["params"])
  if attention:
    # K/V slices travel around the ring (forward and backward).
    assert "collective-permute" in hlo
  else:
    # The per-shard state maps A [n, B, H, K, K] are all-gathered over context (n = 4); no
    # parameter has rank 5, so this all-gather is the sequence-parallel memory's.
    assert re.search(r"f32\[4,\d+,\d+,\d+,\d+\]\{[^}]*\} all-gather", hlo), "no state all-gather"


@pytest.mark.parametrize("kind", ["attention", "memory"])
def test_kernels_per_shard_with_heads_over_tensor(kind):
  """fsdp=2 x tensor=2 x context=2: batch, heads and sequence all split inside the kernels;
  values and gradients equal the single-device op (GQA 4 query / 2 kv heads, two documents)."""
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=2, tensor=2, context=2))
  rng = np.random.default_rng(1)
  b, t, h = 2, 8, 4
  q = jnp.asarray(rng.normal(size=(b, t, h, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, 2 if kind == "attention" else h, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=k.shape), jnp.float32)
  seg = jnp.asarray(np.repeat([[1] * 3 + [2] * 5], b, axis=0), jnp.int32)
  if kind == "attention":
    mask = parallel.attn_ops.Mask(causal=True, window=4, sinks=1)
    f = lambda q, k, v: parallel.attention(q, k, v, mask=mask, segment_ids=(seg, seg))
  else:
    beta = jax.nn.sigmoid(q[..., 0])
    g = -jax.nn.softplus(k[..., 0])
    f = lambda q, k, v: parallel.gated_delta_rule(
      q, k, v, g=g, beta=beta, chunk_size=2, segment_ids=seg
    )[0]
  loss = lambda q, k, v: jnp.sum(f(q, k, v) * jnp.cos(jnp.arange(t))[None, :, None, None])
  ref = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)  # no mesh: the plain op
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  with jax.set_mesh(mesh):
    got = step(q, k, v)
  # float32, different summation order (ring merge by lse / composed state maps).
  for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5, rtol=2e-5)


def test_ring_refuses_a_length_it_cannot_split():
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=2, context=4))
  q = jnp.zeros((2, 12, 2, 8))  # 12 is not a multiple of 2 x 4
  f = jax.jit(lambda q: parallel.attention(q, q, q, mask=parallel.attn_ops.Mask(causal=True)))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"T=12 to be a multiple of 8"):
    f(q)


def test_ring_refuses_an_implementation_it_cannot_run():
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=2, context=4))
  q = jnp.zeros((2, 16, 2, 8))
  mask = parallel.attn_ops.Mask(causal=True)
  f = jax.jit(lambda q: parallel.attention(q, q, q, mask=mask, implementation="pallas_tpu"))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="'pallas_tpu' cannot serve a context"):
    f(q)


def test_prefix_memory_refuses_a_context_mesh():
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=2, context=4))
  q = jnp.zeros((2, 8, 2, 4))
  f = jax.jit(lambda q: parallel.gated_delta_rule(q, q, q, prefix_len=4))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="prefix_len.*context=1"):
    f(q)


def test_without_a_mesh_the_layers_call_the_plain_ops(monkeypatch):
  calls = spy(monkeypatch, "gated_delta_rule_context_parallel")
  q = jnp.ones((1, 8, 2, 4)) * 0.1
  o, _ = parallel.gated_delta_rule(q, q, q, beta=jnp.full((1, 8, 2), 0.5))
  assert o.shape == (1, 8, 2, 4) and not calls
  assert parallel.context_mesh() is None


@pytest.mark.parametrize("mesh_cfg", [MESHES["fsdp=2,context=4"], None])
def test_block_output_is_constrained_to_the_layout(mesh_cfg):
  """The attention layer's output (a block's residual branch) is constrained inside jit: batch
  over fsdp, sequence over context, embed replicated (its axes are taken); no-op without a mesh."""
  layer = Attention(32, 4, 2, 8, rngs=nnx.Rngs(0))
  f = jax.jit(lambda x: layer(x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])))
  x = jnp.ones((4, SEQ, 32))
  constraint = re.compile(r"sdy.sharding_constraint .*<@mesh, (\[.*\])> : tensor<4x16x32xf32>")
  if mesh_cfg is None:
    assert not constraint.search(f.lower(x).as_text())
    return
  mesh = sharding.make_mesh(config_lib.MeshConfig(**mesh_cfg))
  x = jax.device_put(x, NamedSharding(mesh, P()))  # replicated in: the sharding comes from inside
  with jax.set_mesh(mesh):
    lowered = f.lower(x)
  assert constraint.findall(lowered.as_text()) == ['[{"fsdp"}, {"context"}, {}]']
  out = lowered.compile().output_shardings
  assert out.is_equivalent_to(NamedSharding(mesh, P("fsdp", "context", None)), 3)


@pytest.mark.slow
def test_train_on_a_context_mesh_matches_one_device(tmp_path):
  """``train`` end to end (data pipeline, sharded creation, checkpoints) on fsdp=2 x context=4."""
  from pipelines.train.loop import train

  def run(name, mesh):
    raw = {
      "model": {"preset": "tiny", **MODELS["transformer"]},
      "data": {"source": "stdlib", "max_documents": 20, "seq_len": SEQ, "batch_size": 4},
      "train": {"steps": 3, "lr": 1e-2, "warmup_steps": 0, "progress": False, "eval_every": 3},
      "mesh": mesh,
      "run_dir": str(tmp_path / name),
    }
    return train(config_lib.from_dict(raw))

  one, ctx = run("one", {"data": 1}), run("ctx", MESHES["fsdp=2,context=4"])
  for a, b in zip(one.history, ctx.history):
    # Adam after the first step amplifies summation-order noise (see TOL): loose on purpose.
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
  np.testing.assert_allclose(ctx.history[-1]["eval_loss"], one.history[-1]["eval_loss"], rtol=1e-4)
