"""Meshes, logical-axis sharding rules per layout, and running a step under a mesh.

Parameters carry logical axis names (``zoo.layers.params.LOGICAL_AXES``); the rules table of the
mesh's layout (``zoo.layers.parallel.LAYOUTS``, chosen from which mesh axes exceed 1) maps each
to mesh axes (``data``, ``fsdp``, ``tensor``, ``context``). A dimension whose size the mesh axes
do not divide stays replicated, so tiny models run on any mesh. Steps run under
``jax.set_mesh(mesh)`` (``in_mesh``), where the layers constrain their activations by the same
rules and, with ``context > 1``, run ring attention and the sequence-parallel memory.

Many hosts: ``make_mesh`` lays ``jax.devices()`` (every process's) out in the order
``data, fsdp, tensor, context``, so ``context`` is the innermost axis and a ring whose size
divides ``jax.local_device_count()`` stays on one host (its ``ppermute`` never crosses the
network; devices are listed process by process); ``shard_batch`` assembles the global
batch from each process's own rows, which then hold whole sequences.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipelines.config import MeshConfig
from pipelines.errors import InputError
from zoo.layers import parallel
from zoo.layers.parallel import LAYOUTS, MESH_AXES, layout_name, rules

__all__ = [
  "LAYOUTS",
  "MESH_AXES",
  "batch_spec",
  "create_sharded",
  "in_mesh",
  "layout_name",
  "logical_to_spec",
  "make_mesh",
  "param_shardings",
  "place_state",
  "rules",
  "shard_batch",
  "shard_params",
]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 4-axis mesh; one size may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.context]
  if sum(s == -1 for s in sizes) > 1:
    raise InputError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes):
    raise InputError(f"mesh: sizes must be >= 1 or -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    if len(devices) % known:
      raise InputError(f"mesh: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  need = int(np.prod(sizes))
  if need > len(devices):
    raise InputError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {need} devices; {len(devices)} are available"
    )
  # A mesh smaller than the machine uses the first devices (e.g. data=1 for a 1-device run).
  grid = np.asarray(devices[:need]).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Maps logical names to a PartitionSpec by the rules of ``mesh``'s layout, leaving a
  dimension replicated when the mesh axes do not divide it or an earlier dimension uses them."""
  return parallel.logical_to_spec(names, shape, mesh)


def param_shardings(params: nnx.State, mesh: Mesh) -> Any:
  """NamedShardings for an ``nnx.Param`` state, from each parameter's logical axis names."""

  def one(var):
    shape = var.get_value().shape  # an array, or a ShapeDtypeStruct under eval_shape
    names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(build: Callable[[], tuple[Any, nnx.State, Any]], mesh: Mesh):
  """``build() -> (graphdef, params, rest)`` with every parameter created already sharded.

  The initialisers run inside one ``jax.jit`` whose ``out_shardings`` are the layout's, so each
  device computes and holds only its own shard: a model larger than one device's memory can be
  created. ``rest`` (non-parameter state; empty for the zoo's models) comes out replicated.

  Args:
    build: builds the model and splits it (e.g. ``lambda: run.build_model(exp)``); it is
      traced, so it must be a pure function of its closure.
    mesh: the device mesh.

  Returns:
    ``(graphdef, params on mesh, rest on mesh)``.
  """
  graphdef, abstract, _ = jax.eval_shape(build)
  params = jax.jit(lambda: build()[1], out_shardings=param_shardings(abstract, mesh))()
  rest = jax.jit(lambda: build()[2], out_shardings=NamedSharding(mesh, PartitionSpec()))()
  return graphdef, params, rest


def shard_params(params: nnx.State, mesh: Mesh) -> nnx.State:
  shardings = param_shardings(params, mesh)
  return jax.tree.map(
    lambda v, s: v.replace(jax.device_put(v[...], s)),
    params,
    shardings,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def batch_spec(mesh: Mesh, ndim: int) -> PartitionSpec:
  axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  lead = axes if len(axes) > 1 else (axes[0] if axes else None)
  rest = [None] * (ndim - 1)
  # Sequence parallelism: [B, T, ...] inputs are split along T over the context axis.
  if ndim >= 2 and mesh.shape["context"] > 1:
    rest[0] = "context"
  return PartitionSpec(lead, *rest)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host batch on the mesh, batch axis over ``data`` x ``fsdp``.

  With several processes each holds its own rows; the global array is assembled from them.
  """
  out = {}
  for k, v in batch.items():
    sharding = NamedSharding(mesh, batch_spec(mesh, np.ndim(v)))
    if jax.process_count() > 1:
      out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
    else:
      out[k] = jax.device_put(np.asarray(v), sharding)
  return out


def place_state(tree: Any, mesh: Mesh) -> Any:
  """Puts every array not already on ``mesh`` there, replicated (e.g. optimizer step counts),
  so a jitted step sees the same shardings on every call and compiles once."""

  def one(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh == mesh:
      return x
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

  return jax.tree.map(one, tree)


def in_mesh(fn: Callable[..., Any], mesh: Mesh | None) -> Callable[..., Any]:
  """``fn`` (a jitted step) called, and so traced, with ``mesh`` as JAX's context mesh.

  The layers read that mesh while they are traced (``zoo.layers.parallel``); ``lower`` is kept
  so the compiled step can be inspected. ``mesh=None`` returns ``fn`` unchanged.
  """
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  def lower(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn.lower(*args, **kwargs)

  call.lower = lower
  return call
