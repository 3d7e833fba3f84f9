"""Block lists flattened into one sequence of grid steps per owner (the TPU kernels' grids).

A TPU grid is a static box; walking ``[rows, max list length]`` would spend a grid step (~0.35 us,
about the cost of a 256 x 256 x 128 tile) on every padding entry, e.g. half the steps of a causal
mask. Instead each owner gets a flat schedule with exactly one step per visible tile, row-major,
so output blocks are visited in contiguous runs (Pallas writes a block back when its index
changes).

An owner is a query head (forward, dq: ``groups=1``) or a kv head together with its ``G`` query
heads (dk/dv: the kernel's innermost grid axis walks the G heads at each step, so the schedule
holds the union of their lists; tiles a head cannot see are masked in-kernel).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ops.attention.pallas_common import BlockLists


@dataclasses.dataclass(frozen=True)
class FlatSchedule:
  """Per-owner step sequences.

  Every row gets ``max(count, 1)`` steps (a row with nothing visible still writes its output)
  and sequences are padded to a static length ``P`` with do-nothing copies of the last step,
  which keep the same blocks so nothing is re-fetched.

  Attributes:
    rows: int32 ``[Lb, O, P]`` output block (query block, or key block for dk/dv) per step.
    blocks: int32 ``[Lb, O, P]`` input block read in that step.
    meta: int32 ``[Lb, O, P]``: bit 0 compute, bit 1 first step of its row, bit 2 last step.
    owner_map: int32 numpy ``[H // groups]``: schedule index of each owner.
  """

  rows: jax.Array | np.ndarray
  blocks: jax.Array | np.ndarray
  meta: jax.Array | np.ndarray
  owner_map: np.ndarray

  @property
  def steps(self) -> int:
    return int(self.rows.shape[-1])

  @property
  def per_batch(self) -> bool:
    return int(self.rows.shape[0]) > 1

  @property
  def num_owners(self) -> int:
    return int(self.rows.shape[1])


def _owners(lists: BlockLists, groups: int):
  """Owner -> member list indices ``[O, G]`` and head-owner -> owner map.

  Owners whose members use the same lists share one schedule (``head_map`` is static).
  """
  num_owners = len(lists.head_map) // groups
  members = lists.head_map.reshape(num_owners, groups)
  keys = [tuple(m) for m in members]
  uniq = list(dict.fromkeys(keys))
  owner_map = np.asarray([uniq.index(k) for k in keys], np.int32)
  return np.asarray(uniq, np.int32).reshape(len(uniq), groups), owner_map


def _union(ids, counts, members, num_blocks: int, xp):
  """Union of the member heads' lists: (ids ``[Lb, O, rows, n']``, counts ``[Lb, O, rows]``)."""
  ids_m, cnt_m = ids[:, members], counts[:, members]  # [Lb, O, G, rows, n], [Lb, O, G, rows]
  valid = xp.arange(ids.shape[-1]) < cnt_m[..., None]
  marked = xp.where(valid, ids_m, num_blocks)  # invalid entries hit a spare column
  marked = xp.moveaxis(marked, 2, 3).reshape(*marked.shape[:2], marked.shape[3], -1)
  lb, no, nrows, _ = marked.shape
  dense = xp.zeros((lb, no, nrows, num_blocks + 1), dtype=bool)
  if xp is np:
    np.put_along_axis(dense, marked, True, axis=-1)
  else:
    dense = jnp.put_along_axis(dense, marked, True, axis=-1, inplace=False)
  dense = dense[..., :num_blocks]
  length = min(num_blocks, members.shape[1] * ids.shape[-1])
  if xp is np:
    order = np.argsort(~dense, axis=-1, kind="stable")[..., :length]
  else:
    order = jnp.argsort(~dense, axis=-1, stable=True)[..., :length]
  return order, dense.sum(-1)


def _static_length(lists: BlockLists, groups: int, num_blocks: int) -> int:
  """Steps of the worst owner under the static count bounds (for data-dependent lists).

  Member heads with the same Mask share their lists (block indices and segments are per kv
  head and per batch row), so a union is bounded by the sum over distinct Masks only.
  """
  worst = 1
  for owner in range(len(lists.head_map) // groups):
    heads = range(owner * groups, (owner + 1) * groups)
    firsts = {int(lists.mask_group[h]): h for h in reversed(heads)}.values()
    bound = np.minimum(sum(lists.count_bound[h] for h in firsts), num_blocks)
    worst = max(worst, int(np.maximum(bound, 1).sum()))
  return worst


def flat_schedule(lists: BlockLists, groups: int, num_blocks: int) -> FlatSchedule:
  """Flattens ``lists`` for owners of ``groups`` consecutive query heads (see FlatSchedule).

  Args:
    lists: per-head block lists.
    groups: query heads per owner (1, or H // K for dk/dv).
    num_blocks: number of blocks the list entries index (nk for kv lists, nq for q lists).
  """
  static = isinstance(lists.ids, np.ndarray)
  xp = np if static else jnp
  members, owner_map = _owners(lists, groups)
  if groups == 1:
    ids, counts = lists.ids[:, members[:, 0]], lists.counts[:, members[:, 0]]
  else:
    ids, counts = _union(lists.ids, lists.counts, members, num_blocks, xp)
  lb, no, nrows, n = ids.shape
  valid = xp.arange(n) < counts[..., None]  # [Lb, O, rows, n]
  # A row with nothing visible keeps one (non-computing) step to initialise and write output.
  keep = valid | ((counts == 0)[..., None] & (xp.arange(n) == 0))
  keep = keep.reshape(lb, no, -1)
  if static:
    length = max(int(keep.sum(-1).max()), 1)
  else:
    length = _static_length(lists, groups, num_blocks)
  row_of = xp.asarray(np.repeat(np.arange(nrows), n))
  if static:
    order = np.argsort(~keep, axis=-1, kind="stable")[..., :length]
  else:
    order = jnp.argsort(~keep, axis=-1, stable=True)[..., :length]
  if order.shape[-1] < length:  # fewer items than the bound: pad, masked below
    pad = xp.broadcast_to(order[..., -1:], (lb, no, length - order.shape[-1]))
    order = xp.concatenate([order, pad], axis=-1)
  n_keep = keep.sum(-1)[..., None]  # [Lb, O, 1]
  pos = xp.arange(length)
  in_range = pos < n_keep
  last_real = xp.take_along_axis(order, xp.maximum(n_keep - 1, 0), axis=-1)
  order = xp.where(in_range, order, last_real)
  rows = row_of[order]
  blocks = xp.take_along_axis(ids.reshape(lb, no, -1), order, axis=-1)
  compute = xp.take_along_axis(valid.reshape(lb, no, -1), order, axis=-1) & in_range
  prev = xp.concatenate([xp.full_like(rows[..., :1], -1), rows[..., :-1]], axis=-1)
  nxt = xp.concatenate([rows[..., 1:], xp.full_like(rows[..., :1], -1)], axis=-1)
  first = in_range & (rows != prev)
  last = in_range & ((rows != nxt) | (pos == n_keep - 1))
  i32 = lambda x: x.astype(np.int32)
  meta = i32(compute) | (i32(first) << 1) | (i32(last) << 2)
  return FlatSchedule(i32(rows), i32(blocks), meta, owner_map)
