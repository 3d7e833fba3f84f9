"""Committed memory of InfLLM/EM-LLM: retrieval (shared by the device and the host store) and the
host store that keeps committed spans off the accelerator.

A store holds, per batch row, committed spans in order (span ``g`` = memory tokens
``sinks + g*E ..``): ``keys, values [B,N,E,K,Dh]``, event boundaries ``pos [B,N,Q+1]``
(:mod:`zoo.infllm.events`) and representative keys ``reps [B,N,Q,r,K,Dh]``. Event ``(g, j)``
has the flat id ``g*Q + j``; ids increase with time.

:func:`retrieve` is written against an array module ``xp`` (``jax.numpy`` inside a jitted
step for the device store, ``numpy`` in a host callback), so both stores select and gather
the same events.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def _argsort(xp, a):
  if xp is np:
    return np.argsort(a, axis=-1, kind="stable")
  return xp.argsort(a, axis=-1, stable=True)


def _dilate(xp, sel, valid, radius):
  """Adds to ``sel [...,N]`` the ``radius`` valid entries before and after each selected one,
  counting only ``valid`` entries (temporal neighbours skip empty slots)."""
  order = _argsort(xp, (~valid).astype(np.int8))  # valid entries first, in time order
  s = xp.take_along_axis(sel, order, axis=-1)
  out = s
  for d in range(1, radius + 1):
    pad = xp.zeros(s.shape[:-1] + (d,), bool)
    out = out | xp.concatenate([pad, s[..., :-d]], -1) | xp.concatenate([s[..., d:], pad], -1)
  back = xp.take_along_axis(out, _argsort(xp, order), axis=-1)
  return back & valid


def retrieve(xp, store: dict[str, Any], qg, committed, top_k: int, neighbours: int, n_sel: int):
  """Top-``top_k`` events per query and KV head, plus ``neighbours`` temporal neighbours on each
  side of every pick, gathered for attention.

  Args:
    xp: ``numpy`` or ``jax.numpy``.
    store: ``keys, values [B,N,E,K,Dh]``, ``pos [B,N,Q+1]`` int, ``reps [B,N,Q,r,K,Dh]``.
    qg: ``[B,t,K,Dh]`` float32 query per KV head (summed over its query heads, un-rotated).
    committed: ``[B,t]`` int, spans visible to each query (span ``g < committed``).
    top_k: events picked by score ``sum_r <q, rep_r>``.
    neighbours: temporal neighbours added on each side of a pick.
    n_sel: events gathered per query (``<= N*Q``); unused entries are masked.

  Returns:
    ``(keys, values [B,t,K,n_sel*E,Dh], visible [B,t,K,n_sel*E] bool)``.
  """
  keys, pos, reps = store["keys"], store["pos"], store["reps"]
  b, n, e, kh, dh = keys.shape
  q = pos.shape[-1] - 1
  t = qg.shape[1]
  score = xp.einsum("btkd,bnqrkd->btknq", qg, reps.astype(np.float32)).reshape(b, t, kh, n * q)
  span = xp.arange(n * q) // q
  real = (pos[..., :-1] < pos[..., 1:]).reshape(b, 1, 1, n * q)
  valid = real & (span[None, None, None, :] < committed[:, :, None, None])  # [B,t,1,NQ]
  valid = xp.broadcast_to(valid, score.shape)
  score = xp.where(valid, score, -np.inf)
  rank = _argsort(xp, _argsort(xp, -score))
  sel = (rank < top_k) & valid
  if neighbours:
    sel = _dilate(xp, sel, valid, neighbours)
  ids = _argsort(xp, (~sel).astype(np.int8))[..., :n_sel]  # picked events first, by time
  ok = xp.take_along_axis(sel, ids, axis=-1)  # [B,t,K,n_sel]
  g, j = ids // q, ids % q
  bi = xp.arange(b)[:, None, None, None]
  ki = xp.arange(kh)[None, None, :, None]
  gk = keys[bi, g, :, ki, :]  # [B,t,K,n_sel,E,Dh]
  gv = store["values"][bi, g, :, ki, :]
  lo, hi = pos[bi, g, j], pos[bi, g, j + 1]
  tok = xp.arange(e)
  vis = ok[..., None] & (tok >= lo[..., None]) & (tok < hi[..., None])
  shape = (b, t, kh, n_sel * e)
  return gk.reshape(shape + (dh,)), gv.reshape(shape + (dh,)), vis.reshape(shape)


class HostBlockStore:
  """Committed spans of every layer in host memory (numpy), grown by doubling.

  ``append`` checks that the device state and the store agree on how many spans a row has
  committed: a stale or forked decode state (stepping an old state again) is refused, except
  that a row starting a fresh stream (nothing committed yet) clears the row.
  """

  def __init__(self, *, layers, batch, span, kv_heads, head_dim, slots, n_repr, dtype):
    self.batch, self.span, self.slots = batch, span, slots
    self.shapes = {
      "keys": ((span, kv_heads, head_dim), dtype),
      "values": ((span, kv_heads, head_dim), dtype),
      "pos": ((slots + 1,), np.int32),
      "reps": ((slots, n_repr, kv_heads, head_dim), dtype),
    }
    self.layers = [self._empty(4) for _ in range(layers)]
    self.counts = np.zeros((layers, batch), np.int64)

  def _empty(self, cap):
    return {k: np.zeros((self.batch, cap, *s), dt) for k, (s, dt) in self.shapes.items()}

  @property
  def nbytes(self) -> int:
    """Bytes of the committed spans (excluding the unused tail of the buffers)."""
    per_span = sum(int(np.prod(s)) * np.dtype(dt).itemsize for s, dt in self.shapes.values())
    return int(self.counts.sum()) * per_span

  def _check_batch(self, b):
    if b != self.batch:
      raise ValueError(
        f"host block store was opened for batch {self.batch}, got a batch of {b}: a store "
        "serves one decode state (make a new one with init_state)"
      )

  def append(self, layer, c_prev, ok, keys, values, pos, reps):
    """Appends the spans ``ok [B,n]`` of ``keys, values [B,n,E,K,Dh]``, ``pos [B,n,Q+1]``,
    ``reps [B,n,Q,r,K,Dh]`` after the ``c_prev [B]`` spans rows already committed. Returns the
    new counts ``[B]`` int32."""
    self._check_batch(keys.shape[0])
    counts = self.counts[layer]
    for b in range(self.batch):
      if c_prev[b] == 0:
        counts[b] = 0  # a fresh stream in this row
      elif counts[b] != c_prev[b]:
        raise ValueError(
          f"stale decode state: layer {layer} row {b} expects {int(c_prev[b])} committed "
          f"blocks but the host store holds {int(counts[b])}; an offloaded decode state cannot "
          "be stepped twice or forked (start again from init_state)"
        )
    need = int((counts + ok.sum(-1)).max())
    store = self.layers[layer]
    cap = store["keys"].shape[1]
    if need > cap:
      grown = self._empty(max(need, 2 * cap))
      for k in store:
        grown[k][:, :cap] = store[k]
      store = self.layers[layer] = grown
    for b in range(self.batch):
      n = int(ok[b].sum())  # committed spans are a prefix of the candidates
      c = int(counts[b])
      for k, x in (("keys", keys), ("values", values), ("pos", pos), ("reps", reps)):
        store[k][b, c : c + n] = x[b, :n]
      counts[b] = c + n
    return counts.astype(np.int32)

  def retrieve(self, layer, qg, committed, top_k, neighbours, n_sel):
    """:func:`retrieve` over this layer's spans, padded to ``n_sel`` events."""
    self._check_batch(qg.shape[0])
    n = int(self.counts[layer].max())
    b, t, kh, dh = qg.shape
    e = self.span
    if n == 0:
      z = np.zeros((b, t, kh, n_sel * e, dh), self.shapes["keys"][1])
      return z, z, np.zeros((b, t, kh, n_sel * e), bool)
    view = {k: x[:, :n] for k, x in self.layers[layer].items()}
    # rows with fewer spans: their tail is stale data, hidden by the per-row count
    committed = np.minimum(committed, self.counts[layer][:, None])
    m = min(n_sel, n * self.slots)
    gk, gv, vis = retrieve(np, view, qg, committed, top_k, neighbours, m)
    if m < n_sel:
      pad = [(0, 0)] * 3 + [(0, (n_sel - m) * e)]
      gk, gv = np.pad(gk, pad + [(0, 0)]), np.pad(gv, pad + [(0, 0)])
      vis = np.pad(vis, pad)
    return gk, gv, vis


_STORES: dict[int, HostBlockStore] = {}
_IDS = itertools.count(1)


def open_store(**shapes) -> int:
  """Creates a :class:`HostBlockStore` and returns its handle (an int carried in the state)."""
  handle = next(_IDS)
  _STORES[handle] = HostBlockStore(**shapes)
  return handle


def get_store(handle) -> HostBlockStore:
  handle = int(handle)
  if handle not in _STORES:
    raise ValueError(f"no host block store {handle} (released, or a state from another process)")
  return _STORES[handle]


def release_store(handle) -> None:
  """Frees the host memory of a store; states holding its handle can no longer be stepped."""
  _STORES.pop(int(handle), None)
