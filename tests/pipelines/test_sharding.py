"""Sharded training on 8 fake CPU devices: every mesh layout takes the same step as one device,
and a checkpoint saved under one layout restores onto another."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipelines import config as config_lib
from pipelines import sharding
from pipelines.run import build_model
from pipelines.train.checkpoint import Checkpointer, abstract
from pipelines.train.loop import make_train_step
from pipelines.train.optim import optimizer

# float32 everywhere; sharded matmuls and reductions sum in a different order than one device.
# Parameters are compared after an SGD step: Adam's first step is lr * g / |g|, which turns
# summation-order noise in a near-zero gradient into a full lr-sized difference.
TOL = {"loss": 1e-5, "params": 2e-5}
SGD_LR = 0.5

LAYOUTS = {
  "data=8": {"data": 8},
  "fsdp=8": {"data": 1, "fsdp": 8},
  "fsdp=4,tensor=2": {"data": 1, "fsdp": 4, "tensor": 2},
  "fsdp=4,context=2": {"data": 1, "fsdp": 4, "context": 2},
}
# Each layout compiles its own step (~10 s on an idle 2-core machine); the two 2-D layouts
# cover every mesh axis but data, so the 1-D ones are marked slow.
SLOW = {"data=8", "fsdp=8"}


def experiment(mesh: dict, tmp_path=None):
  raw = {
    "model": {
      "preset": "tiny",
      "d_model": 32,
      "n_layers": 1,
      "n_heads": 4,
      "n_kv_heads": 2,
      "d_ff": 64,
    },
    "data": {"seq_len": 16, "batch_size": 8},
    "train": {"lr": 1e-2, "warmup_steps": 0, "progress": False},
    "mesh": mesh,
    "run_dir": str(tmp_path or "unused"),
  }
  return config_lib.from_dict(raw)


def batch(seed=0, b=8, t=16, vocab=260):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[:, t // 2 :] = 2  # two packed documents per row exercise segment masking
  return {
    "inputs": toks[:, :-1],
    "targets": toks[:, 1:],
    "segment_ids": seg,
    "loss_mask": np.ones((b, t), np.float32),
  }


def one_step(mesh_cfg: dict):
  """(loss, params, param shardings) after one train step on ``mesh_cfg``."""
  exp = experiment(mesh_cfg)
  mesh = sharding.make_mesh(exp.mesh)
  graphdef, params, rest = build_model(exp)
  params = sharding.shard_params(params, mesh)
  tx = optax.sgd(SGD_LR)
  opt = sharding.place_state(tx.init(params), mesh)
  # Under the mesh, as `train` runs it: activations constrained, ring attention on `context`.
  step = make_train_step(graphdef, rest, tx, exp.train, mesh)
  new_params, _, metrics = step(params, opt, sharding.shard_batch(batch(), mesh))
  shardings = [x.sharding for x in jax.tree.leaves(new_params)]
  return float(metrics["loss"]), [np.asarray(x) for x in jax.tree.leaves(new_params)], shardings


@pytest.fixture(scope="module")
def single_device():
  return one_step({"data": 1})


@pytest.mark.parametrize(
  "layout", [pytest.param(k, marks=[pytest.mark.slow] if k in SLOW else []) for k in LAYOUTS]
)
def test_layout_step_matches_one_device(layout, single_device):
  assert len(jax.devices()) == 8, "conftest must give 8 fake CPU devices"
  loss, params, shardings = one_step(LAYOUTS[layout])
  ref_loss, ref_params, _ = single_device
  initial = [np.asarray(x) for x in jax.tree.leaves(build_model(experiment({"data": 1}))[1])]
  assert max(np.abs(a - b).max() for a, b in zip(ref_params, initial)) > 100 * TOL["params"]
  np.testing.assert_allclose(loss, ref_loss, rtol=TOL["loss"])
  for a, b in zip(params, ref_params):
    np.testing.assert_allclose(a, b, atol=TOL["params"], rtol=TOL["params"])
  # The layout really splits something: at least one parameter is not fully replicated.
  if layout != "data=8":
    assert any(not s.is_fully_replicated for s in shardings)


@pytest.mark.parametrize(
  "mesh_cfg, layout",
  [
    ({"data": 8}, "data"),
    ({"data": 1, "fsdp": 8}, "fsdp"),
    ({"data": 1, "fsdp": 4, "tensor": 2}, "fsdp_tensor"),
    ({"data": 1, "fsdp": 4, "context": 2}, "fsdp_context"),
    ({"data": 1, "fsdp": 2, "tensor": 2, "context": 2}, "fsdp_tensor_context"),
  ],
)
def test_each_layout_has_its_rules_table(mesh_cfg, layout):
  exp = experiment(mesh_cfg)
  mesh = sharding.make_mesh(exp.mesh)
  assert sharding.layout_name(mesh) == layout
  assert sharding.rules(mesh) is sharding.LAYOUTS[layout]
  _, params, _ = build_model(exp)
  # wq is [embed=32, heads=4, head_dim=8]: the table decides which mesh axes split it.
  want = {
    "data": P(None, None, None),
    "fsdp": P("fsdp", None, None),
    "fsdp_tensor": P("fsdp", "tensor", None),
    "fsdp_context": P("fsdp", None, None),
    "fsdp_tensor_context": P("fsdp", "tensor", None),
  }[layout]
  wq = sharding.param_shardings(params, mesh)["blocks"][0]["attn"]["wq"]
  assert wq.spec == want
  # Activations [B=8, T=16, D=32]: batch over data x fsdp, sequence over context.
  act = sharding.logical_to_spec(("batch", "seq", "embed"), (8, 16, 32), mesh)
  batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  seq = "context" if mesh.shape["context"] > 1 else None
  assert act == P(batch_axes[0] if len(batch_axes) == 1 else batch_axes, seq, None)


def test_parameters_are_created_already_sharded():
  exp = experiment(LAYOUTS["fsdp=4,context=2"])
  mesh = sharding.make_mesh(exp.mesh)
  graphdef, params, rest = sharding.create_sharded(lambda: build_model(exp), mesh)
  eager_graphdef, eager, _ = build_model(exp)
  assert graphdef == eager_graphdef
  want = sharding.param_shardings(eager, mesh)
  for got, ref, spec in zip(jax.tree.leaves(params), jax.tree.leaves(eager), jax.tree.leaves(want)):
    assert got.sharding.is_equivalent_to(spec, got.ndim)
    # Same initialisers and keys; XLA may fuse the normal transform differently under jit.
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-7)
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))


def test_context_axis_splits_the_sequence():
  exp = experiment(LAYOUTS["fsdp=4,context=2"])
  mesh = sharding.make_mesh(exp.mesh)
  placed = sharding.shard_batch(batch(), mesh)
  shard_shapes = {s.data.shape for s in placed["inputs"].addressable_shards}
  assert shard_shapes == {(2, 8)}


def test_checkpoint_saved_fsdp8_restores_as_data2_fsdp4(tmp_path):
  exp_a = experiment(LAYOUTS["fsdp=8"])
  mesh_a = sharding.make_mesh(exp_a.mesh)
  _, params, _ = build_model(exp_a)
  params = sharding.shard_params(params, mesh_a)
  # Saved values differ from a fresh init, so restoring cannot pass by re-initialising.
  params = jax.tree.map(lambda x: x * 2.0 + 1.0, params)
  tx = optimizer(exp_a.train)
  state = {"params": params, "opt": sharding.place_state(tx.init(params), mesh_a)}
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(3, state, None, {"step": 3})
  ckpt.close()

  exp_b = experiment({"data": 2, "fsdp": 4})
  mesh_b = sharding.make_mesh(exp_b.mesh)
  _, fresh, _ = build_model(exp_b)
  fresh = sharding.shard_params(fresh, mesh_b)
  target = abstract({"params": fresh, "opt": sharding.place_state(tx.init(fresh), mesh_b)})
  ckpt = Checkpointer(tmp_path, async_save=False)
  step, restored, _, _ = ckpt.restore(target)
  ckpt.close()
  assert step == 3
  for got, want, spec in zip(
    jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(target)
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert isinstance(got.sharding, NamedSharding) and got.sharding.mesh == mesh_b
    assert got.sharding.is_equivalent_to(spec.sharding, got.ndim)
