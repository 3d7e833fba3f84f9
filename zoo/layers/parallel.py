"""Layers under a device mesh: logical-axis rules per layout, activation constraints, and the
kernels run per shard (ring attention and sequence-parallel memory on the ``context`` axis).

The mesh reaches the layers through JAX itself: the pipelines run a step under
``jax.set_mesh(mesh)`` and the layers read ``jax.sharding.get_abstract_mesh()`` while they are
traced. The context mesh is part of ``jax.jit``'s cache key, so a step traced without a mesh is
never reused under one (a context object of our own would not be). Without a mesh, or with a
mesh whose ``context`` axis has size 1, every function here is the plain single-device op.

The layout (which rules table) is a function of the mesh shape only, so the parameters placed by
``pipelines.sharding`` and the activations constrained here always agree.

Who runs per shard: ``zoo.layers.attention.Attention`` (every transformer block, the attention
layers of the hybrids) calls :func:`attention`; the DeltaNet/gated DeltaNet/BASED mixer, Mamba-2
and MoM call :func:`gated_delta_rule`. Decode paths (``step``) never use the ring. Layers that
call ``ops.attention`` directly with their own masks or caches (DuoAttention's per-head forward,
the sink/window and block-memory caches, landmark, Titans MAC) are still partitioned by XLA.
Limits: the ring needs ``T`` to be a multiple of ``2 x context``; JRT's non-causal prefix has no
sequence-parallel form and is refused on a context mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

import ops.attention as attn_ops
import ops.memory as mem_ops
from ops.memory import gated_delta_rule_context_parallel

MESH_AXES = ("data", "fsdp", "tensor", "context")

Rules = dict[str, tuple[str, ...]]

_BATCH = ("data", "fsdp")
_TENSOR = {"mlp": ("tensor",), "heads": ("tensor",), "kv_heads": ("tensor",), "vocab": ("tensor",)}

# One table per layout: logical name -> mesh axes, in order of preference. Names not listed stay
# replicated. Context layouts keep the parameters replicated over ``context``: sharding ``embed``
# over fsdp x context as well (ZeRO over the ring) made XLA rematerialise the embedding gradient
# in full (an "involuntary full rematerialization" on 8 fake devices), so it is not the default.
LAYOUTS: dict[str, Rules] = {
  "data": {"batch": _BATCH},
  "fsdp": {"batch": _BATCH, "embed": ("fsdp",)},
  "fsdp_tensor": {"batch": _BATCH, "embed": ("fsdp",), **_TENSOR},
  "fsdp_context": {"batch": _BATCH, "seq": ("context",), "embed": ("fsdp",)},
  "fsdp_tensor_context": {"batch": _BATCH, "seq": ("context",), "embed": ("fsdp",), **_TENSOR},
}

# The residual stream between blocks.
ACTIVATION = ("batch", "seq", "embed")


def layout_name(mesh: Any) -> str:
  """The layout of a mesh (``Mesh`` or ``AbstractMesh``) from which of its axes exceed 1."""
  shape = dict(mesh.shape)
  tensor, context = shape.get("tensor", 1) > 1, shape.get("context", 1) > 1
  if tensor and context:
    return "fsdp_tensor_context"
  if context:
    return "fsdp_context"
  if tensor:
    return "fsdp_tensor"
  return "fsdp" if shape.get("fsdp", 1) > 1 else "data"


def rules(mesh: Any) -> Rules:
  """The rules table of ``mesh``'s layout."""
  return LAYOUTS[layout_name(mesh)]


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Any) -> PartitionSpec:
  """Logical axis names of an array of ``shape`` -> a ``PartitionSpec`` on ``mesh``.

  A dimension stays replicated when the mesh axes do not divide it or an earlier dimension
  already uses them; mesh axes of size 1 are dropped. So tiny models run on any mesh.
  """
  table = rules(mesh)
  used: set[str] = set()
  spec: list[Any] = []
  for name, size in zip(names, shape):
    axes = table.get(name, ()) if name is not None else ()
    axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or size % n:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes if len(axes) > 1 else axes[0])
  return PartitionSpec(*spec)


def active_mesh() -> Any | None:
  """The abstract mesh set by ``jax.set_mesh`` (None when there is none)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def context_mesh() -> Any | None:
  """The active mesh if it splits the sequence (``context > 1``), else None."""
  mesh = active_mesh()
  if mesh is None or mesh.shape.get("context", 1) == 1:
    return None
  return mesh


def constrain(x: jax.Array, names: Sequence[str | None] = ACTIVATION) -> jax.Array:
  """``with_sharding_constraint`` of ``x`` by logical ``names``; a no-op without a mesh.

  Args:
    x: an activation, e.g. the residual stream ``[B,T,D]``.
    names: one logical name per dimension of ``x``.

  Returns:
    ``x``, constrained to the layout's sharding when a mesh is active.
  """
  mesh = active_mesh()
  if mesh is None or mesh.size == 1:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of {x.shape}")
  spec = logical_to_spec(names, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def _local_axes(mesh: Any, name: str, *sizes: int) -> tuple[str, ...]:
  """The mesh axes of logical ``name`` (excluding context) that divide every one of ``sizes``."""
  axes = tuple(a for a in rules(mesh).get(name, ()) if a != "context" and mesh.shape[a] > 1)
  n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  return axes if axes and all(s % n == 0 for s in sizes) else ()


def _spec_entry(axes: tuple[str, ...]) -> Any:
  return None if not axes else (axes if len(axes) > 1 else axes[0])


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: attn_ops.Mask | Sequence[attn_ops.Mask],
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """Full-sequence self-attention; ring attention over ``context`` when the mesh splits it.

  Under a context mesh, batch rows stay on their ``data``/``fsdp`` devices and heads on their
  ``tensor`` devices (an outer ``shard_map`` over those axes), and the ring runs over
  ``context`` inside it: each device only ever holds its own slice of the sequence.

  Args:
    q: ``[B,T,H,Dh]``, query ``i`` at position ``i``.
    k: ``[B,T,K,Dh]``.
    v: ``[B,T,K,Dh]``.
    mask: an ``ops.attention.Mask`` or one per query head (causal, window, sinks, prefix).
    segment_ids: ``([B,T], [B,T])`` packed-document ids or None.
    implementation: the single-device kernel. The ring runs the blockwise ``"xla"`` kernel
      per step, so under a context mesh only None or a choice that includes ``"xla"`` is
      served; any other explicit choice is refused rather than silently replaced.

  Returns:
    ``o [B,T,H,Dh]`` in ``q.dtype``.
  """
  mesh = context_mesh()
  if mesh is None:
    return attn_ops.dot_product_attention(
      q, k, v, mask=mask, segment_ids=segment_ids, implementation=implementation
    )
  names = (implementation,) if isinstance(implementation, str) else tuple(implementation or ())
  if names and "xla" not in names:
    raise ValueError(
      f"attention implementation={implementation!r} cannot serve a context mesh: ring "
      "attention runs the blockwise 'xla' kernel per step (set attention_impl to null or 'xla')"
    )
  b, t, h, _ = q.shape
  n = mesh.shape["context"]
  if t % (2 * n):
    raise ValueError(
      f"ring attention over context={n} needs the sequence length T={t} to be a multiple of "
      f"{2 * n} (two load-balanced chunks per device); pick data.seq_len accordingly"
    )
  batch = _local_axes(mesh, "batch", b)
  heads = _local_axes(mesh, "heads", h, k.shape[2])
  if not isinstance(mask, attn_ops.Mask) and heads:
    heads = ()  # per-head masks index the global heads: keep heads whole on each device
  qkv = PartitionSpec(_spec_entry(batch), None, _spec_entry(heads), None)
  seg = PartitionSpec(_spec_entry(batch), None)
  manual = set(batch + heads)

  def ring(q, k, v, segment_ids):
    return attn_ops.ring_attention(
      q,
      k,
      v,
      mesh=jax.sharding.get_abstract_mesh(),
      mask=mask,
      segment_ids=segment_ids,
      implementation=implementation,
    )

  if not manual:
    return ring(q, k, v, segment_ids)
  return jax.shard_map(
    ring,
    mesh=mesh,
    in_specs=(qkv, qkv, qkv, None if segment_ids is None else (seg, seg)),
    out_specs=qkv,
    axis_names=manual,
    check_vma=False,
  )(q, k, v, segment_ids)


def gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs: Any):
  """``ops.memory.gated_delta_rule``; sequence-parallel over ``context`` when the mesh splits it.

  Under a context mesh, ``gated_delta_rule_context_parallel`` runs each device's slice of the
  sequence and passes the memory state between slices; batch rows stay on ``data``/``fsdp``
  and heads on ``tensor`` where those divide them.

  Args:
    q: ``[B,T,H,K]``.
    k: ``[B,T,H,K]``.
    v: ``[B,T,H,V]``.
    **kwargs: as ``ops.memory.gated_delta_rule`` (``prefix_len`` is not sequence-parallel).

  Returns:
    ``(o [B,T,H,V], final_state [B,H,K,V] or None)``.
  """
  mesh = context_mesh()
  if mesh is None:
    return mem_ops.gated_delta_rule(q, k, v, **kwargs)
  if kwargs.pop("prefix_len", None):
    raise ValueError(
      "prefix_len (JRT-RNN's non-causal prefix) has no sequence-parallel form; "
      "run it on a mesh with context=1"
    )
  b, t, h, _ = q.shape
  n = mesh.shape["context"]
  if t % n:
    raise ValueError(
      f"the sequence-parallel memory over context={n} needs T={t} to be a multiple of {n}"
    )
  batch = _local_axes(mesh, "batch", b)
  heads = _local_axes(mesh, "heads", h)
  return gated_delta_rule_context_parallel(
    q,
    k,
    v,
    mesh=mesh,
    batch_axis=_spec_entry(batch),
    head_axis=_spec_entry(heads),
    **kwargs,
  )
