"""Context-parallel gated delta rule: time sharded over a ``context`` mesh axis.

A shard's tokens map its incoming state affinely, ``S_out = A S_in + Bm`` with ``A [K,K]``
(the product of the per-token ``(I - beta k k^T) diag(exp(g))``) and ``Bm [K,V]`` (what the
shard writes from a zero state). Each shard computes its ``(A, Bm)`` in one local pass, the
pairs are all-gathered and prefix-combined (a handful of ``[K,K] @ [K,V]`` products per device),
and a second local pass with the right incoming state gives the outputs. Gradients come from
autodiff through ``shard_map`` (the all-gather transposes to a reduce-scatter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ops.memory.gated_delta.api import check_inputs, gated_delta_rule


def gated_delta_rule_context_parallel(
  q,
  k,
  v,
  *,
  mesh,
  g=None,
  beta=None,
  scale: float | None = None,
  initial_state=None,
  output_final_state: bool = False,
  chunk_size: int = 64,
  segment_ids=None,
  axis_name: str = "context",
  batch_axis: str | None = None,
  head_axis: str | None = None,
  implementation=None,
  interpret: bool | None = None,
):
  """:func:`ops.memory.gated_delta_rule` with T split over ``mesh.shape[axis_name]`` devices.

  Args:
    q: ``[B,T,H,K]``; ``T`` must divide evenly over the ``axis_name`` devices.
    k: ``[B,T,H,K]``.
    v: ``[B,T,H,V]``.
    mesh: a ``jax.sharding.Mesh`` with an ``axis_name`` axis (Auto axes, or Explicit ones under
      ``jax.set_mesh(mesh)``, where the inputs are resharded to the specs here).
    g: ``None``, ``[B,T,H]`` or ``[B,T,H,K]`` log decay (<= 0).
    beta: ``None`` or ``[B,T,H]`` in [0, 1].
    scale: output scale, default ``K**-0.5``.
    initial_state: ``None`` or ``[B,H,K,V]``.
    output_final_state: return the state after the last token.
    chunk_size: chunk of the local chunked algorithm (a power of two).
    segment_ids: optional ``[B,T]`` int ids of packed sequences (resets may fall on a shard
      boundary).
    axis_name: the mesh axis that splits time.
    batch_axis: optional mesh axis that splits B.
    head_axis: optional mesh axis that splits H.
    implementation: the per-shard implementation, as in ``gated_delta_rule`` (None: by
      backend, with fallback).
    interpret: as in ``gated_delta_rule``.

  Returns:
    ``(o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32 or None)``.
  """
  B, T, H, K, V = check_inputs(q, k, v, g, beta, initial_state)
  if axis_name not in mesh.shape:
    raise ValueError(f"mesh has no axis {axis_name!r}; its axes are {tuple(mesh.shape)}")
  n = mesh.shape[axis_name]
  if T % n:
    raise ValueError(f"T={T} must divide evenly over the {n} devices of mesh axis {axis_name!r}")
  if scale is None:
    scale = K**-0.5
  if initial_state is None:
    initial_state = jnp.zeros((B, H, K, V), jnp.float32)
  local_kwargs = dict(
    scale=scale, chunk_size=chunk_size, implementation=implementation, interpret=interpret
  )

  def local(q, k, v, g, beta, s0, seg):
    Bl, _, Hl, _ = q.shape
    # Values [v, 0] from state [0, I] give [Bm, A] in one pass: every value column evolves by
    # the same map on K, and the identity columns carry no writes.
    v_ext = jnp.concatenate([v.astype(jnp.float32), jnp.zeros(v.shape[:-1] + (K,))], axis=-1)
    eye = jnp.broadcast_to(jnp.eye(K), (Bl, Hl, K, K))
    s_ext = jnp.concatenate([jnp.zeros((Bl, Hl, K, V)), eye], axis=-1)
    _, s_ext = gated_delta_rule(
      q,
      k,
      v_ext,
      g=g,
      beta=beta,
      initial_state=s_ext,
      output_final_state=True,
      segment_ids=seg,
      **local_kwargs,
    )
    maps_a = jax.lax.all_gather(s_ext[..., V:], axis_name)  # [n,B,H,K,K]
    maps_b = jax.lax.all_gather(s_ext[..., :V], axis_name)  # [n,B,H,K,V]
    if seg is None:
      keep = jnp.ones((n, Bl), jnp.float32)
    else:
      # A shard whose first token starts a segment does not see the state before it.
      last = jax.lax.all_gather(seg[:, -1], axis_name)  # [n,B]
      first = jax.lax.all_gather(seg[:, 0], axis_name)
      keep = jnp.concatenate([jnp.ones((1, Bl)), (first[1:] == last[:-1])], axis=0)
    states_in = []
    state = s0.astype(jnp.float32)
    for d in range(n):
      state = keep[d][:, None, None, None] * state
      states_in.append(state)
      state = maps_a[d] @ state + maps_b[d]
    state_in = jnp.stack(states_in)[jax.lax.axis_index(axis_name)]
    o, _ = gated_delta_rule(
      q, k, v, g=g, beta=beta, initial_state=state_in, segment_ids=seg, **local_kwargs
    )
    return o, state

  seq = P(batch_axis, axis_name, head_axis)
  state_spec = P(batch_axis, head_axis)
  in_specs = (
    seq,
    seq,
    seq,
    None if g is None else seq,
    None if beta is None else seq,
    state_spec,
    None if segment_ids is None else P(batch_axis, axis_name),
  )
  fn = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=in_specs,
    out_specs=(seq, state_spec),
    check_vma=False,
  )
  args = (q, k, v, g, beta, initial_state, segment_ids)
  if jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):
    # Explicit meshes do not reshard implicitly at the shard_map boundary.
    args = tuple(
      x if x is None else jax.reshard(x, jax.sharding.NamedSharding(mesh, spec))
      for x, spec in zip(args, in_specs)
    )
  o, state = fn(*args)
  return o, state if output_final_state else None
