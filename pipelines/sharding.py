"""Meshes and logical-axis sharding rules.

Parameters carry logical axis names (``zoo.layers.params.LOGICAL_AXES``); a rules table maps each
to a mesh axis (``data``, ``fsdp``, ``tensor``, ``context``). A dimension whose size the mesh axis
does not divide stays replicated, so tiny models run on any mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipelines.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Logical name -> mesh axes. One table serves every layout: axes of size 1 are no-ops.
RULES: dict[str, tuple[str, ...] | None] = {
  "batch": ("data", "fsdp"),
  "seq": ("context",),
  "embed": ("fsdp",),
  "mlp": ("tensor",),
  "heads": ("tensor",),
  "kv_heads": ("tensor",),
  "head_dim": None,
  "vocab": ("tensor",),
  "state": None,
  "layers": None,
}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 4-axis mesh; one size may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.context]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be >= 1 or -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  need = int(np.prod(sizes))
  if need > len(devices):
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {need} devices; {len(devices)} are available"
    )
  # A mesh smaller than the machine uses the first devices (e.g. data=1 for a 1-device run).
  grid = np.asarray(devices[:need]).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Maps logical names to a PartitionSpec, leaving a dimension replicated when the mesh axes
  do not divide it or are already used by an earlier dimension."""
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = RULES.get(name) if name is not None else None
    axes = tuple(a for a in (axes or ()) if a not in used and mesh.shape[a] > 1)
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or size % n:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes if len(axes) > 1 else axes[0])
  return PartitionSpec(*spec)


def param_shardings(params: nnx.State, mesh: Mesh) -> Any:
  """NamedShardings for an ``nnx.Param`` state, from each parameter's logical axis names."""

  def one(var):
    names = var.get_metadata().get("out_sharding") or (None,) * var[...].ndim
    return NamedSharding(mesh, logical_to_spec(names, var[...].shape, mesh))

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
