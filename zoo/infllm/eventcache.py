"""InfLLM/EM-LLM memory that commits whole spans at eviction time, on device or in host memory.

The device state has a fixed size: sinks ``[B,s,K,Dh]``, the local window ``[B,w-1,K,Dh]`` and
the ``E = block_size`` tokens before it (``pend``), which hold every evicted token whose span is
not committed yet. When a span has fully left the window it is committed: segmented into
events (one event for InfLLM's fixed blocks, surprise + refinement for EM-LLM, see
:mod:`zoo.infllm.events`), given representative keys, and written to the store:

- ``offload=False``: device arrays sized by ``init_state(max_len)``;
- ``offload=True``: a :class:`zoo.infllm.store.HostBlockStore`, through ordered
  ``io_callback`` s (append the committed spans, then score and gather the top-k events), so
  it works inside ``jit`` and ``lax.scan``. Device memory does not grow with the stream;
  host memory does. Inference only: differentiating through it raises.

What a query sees is exactly :class:`zoo.infllm.memory.BlockMemoryCache`'s rule (sinks,
window, retrieved committed events, the evicted tokens of uncommitted spans), so with fixed
segmentation both give the same logits.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from ops.attention import merge_pair
from zoo.infllm import events
from zoo.infllm.store import get_store, retrieve
from zoo.layers.cache import SinkCache, attend_dense, write_prefix


def attend_gathered(q, k, v, visible, scale):
  """Attention of each query over its own gathered keys.

  Args:
    q: ``[B,t,H,Dh]``; k, v: ``[B,t,K,S,Dh]`` (per query and KV head); visible:
      ``[B,t,K,S]`` bool; scale: logit scale.

  Returns:
    ``(o [B,t,H,Dh] float32, lse [B,t,H] float32)``; no visible key gives 0, -inf.
  """
  b, t, h, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, h // kh, d).astype(jnp.float32)
  s = jnp.einsum("btkgd,btksd->btkgs", qg, k.astype(jnp.float32)) * scale
  vis = visible[:, :, :, None, :]
  s = jnp.where(vis, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  o = jnp.einsum("btkgs,btksd->btkgd", p, v.astype(jnp.float32))
  return o.reshape(b, t, h, d), lse.reshape(b, t, h)


@jax.custom_jvp
def _inference_only(x):
  return x


@_inference_only.defjvp
def _inference_only_jvp(primals, tangents):
  raise ValueError(
    "InfLLM host offload (offload=True) is inference-only: the host store is written through "
    "callbacks that cannot be differentiated; use offload=False to take gradients"
  )


@dataclasses.dataclass(frozen=True)
class EventMemoryCache:
  """Sinks + window + top-k retrieved events (+ temporal neighbours); see the module docstring.

  ``segmentation="fixed"``: one event per span (InfLLM blocks). ``"surprise"``: EM-LLM events
  from the surprise of each token (passed to :meth:`step`), ``surprise_gamma`` standard
  deviations over the ``surprise_window`` previous tokens, at least ``min_event`` tokens,
  boundaries refined within ``refine`` tokens by modularity.
  """

  sinks: int
  window: int
  block_size: int
  top_k: int
  n_repr: int
  segmentation: str = "fixed"
  surprise_gamma: float = 1.0
  surprise_window: int = 32
  min_event: int = 4
  refine: int = 0
  neighbours: int = 0
  offload: bool = False
  implementation: str | None = None

  @property
  def slots(self) -> int:
    """Event slots per span (``Q``)."""
    return 1 if self.segmentation == "fixed" else self.block_size // self.min_event

  @property
  def history(self) -> int:
    """Surprises a step needs, ending at the newest seen token: window + span + threshold
    window (see :meth:`step`)."""
    return self.window + self.block_size - 1 + self.surprise_window

  def n_sel(self, n_events: int | None = None) -> int:
    n = self.top_k * (1 + 2 * self.neighbours)
    return n if n_events is None else min(n, n_events)

  def init(self, attn, batch: int, max_len: int, dtype) -> dict[str, jax.Array]:
    """``sink_k/v``, ``win_k/v``, ``pend_k/v [B,E,K,Dh]`` (positions ``L-w-E+1 .. L-w``); on
    device also the store ``keys, values [B,M,E,K,Dh]``, ``pos [B,M,Q+1]``,
    ``reps [B,M,Q,r,K,Dh]`` for ``M`` spans of a ``max_len`` stream."""
    kh, dh, e = attn.n_kv_heads, attn.head_dim, self.block_size
    z = lambda *shape, dt=dtype: jnp.zeros((batch, *shape), dt)  # noqa: E731
    cache = {
      **SinkCache(0, self.window).init_heads(batch, kh, dh, dtype),
      "sink_k": z(self.sinks, kh, dh), "sink_v": z(self.sinks, kh, dh),
      "pend_k": z(e, kh, dh), "pend_v": z(e, kh, dh),
    }  # fmt: skip
    if not self.offload:
      m = max(1, -(-max(max_len - self.sinks, 1) // e))
      q = self.slots
      cache |= {
        "keys": z(m, e, kh, dh), "values": z(m, e, kh, dh),
        "pos": z(m, q + 1, dt=jnp.int32), "reps": z(m, q, self.n_repr, kh, dh),
      }  # fmt: skip
    return cache

  def step(self, attn, x, cache, lengths, *, surprise=None, store=None, layer=0):
    """``x [B,t,D]`` -> ``([B,t,D], cache)``; ``lengths [B]`` tokens seen before.

    ``surprise [B,history]`` (EM-LLM): surprises of positions ``L-history .. L-1``.
    ``store`` (offload): the host store handle; ``layer``: this layer's index in it.
    """
    if self.offload:
      x = _inference_only(x)
    q, k, v = attn.project(x)
    b, t, h, d = q.shape
    s, w, e = self.sinks, self.window, self.block_size
    if self.segmentation == "surprise" and t > w:
      raise ValueError(
        f"EM-LLM steps of {t} tokens exceed the window {w}: a span would be segmented before "
        "the surprise of its last tokens is known"
      )
    rotate = lambda y, pos: attn.rotate(y, pos, s + w)  # noqa: E731
    local = SinkCache(0, w, implementation=self.implementation)
    o, lse, kw, vw = local.window_part(rotate, q, k, v, cache, lengths)
    dt = cache["pend_k"].dtype
    # full[i] is position L - w - e + 1 + i: pend, then the window, then the new tokens
    full_k = jnp.concatenate([cache["pend_k"], kw], axis=1)
    full_v = jnp.concatenate([cache["pend_v"], vw], axis=1)
    sink_k = write_prefix(cache["sink_k"], k.astype(dt), lengths)
    sink_v = write_prefix(cache["sink_v"], v.astype(dt), lengths)
    new = {
      "win_k": kw[:, t:], "win_v": vw[:, t:], "sink_k": sink_k, "sink_v": sink_v,
      "pend_k": full_k[:, t : t + e], "pend_v": full_v[:, t : t + e],
    }  # fmt: skip

    # Commit the spans that left the window during this step.
    first = lengths - w - e + 1  # position of full[0]
    c_prev = jnp.maximum(lengths - w - s, 0) // e
    c_new = jnp.maximum(lengths + t - w - s, 0) // e
    nc = t // e + 1
    g = c_prev[:, None] + jnp.arange(nc)  # [B, nc]
    ok = g < c_new[:, None]
    idx = jnp.clip((s + g * e - first[:, None])[..., None] + jnp.arange(e), 0, full_k.shape[1] - 1)
    idx = idx.reshape(b, nc * e, 1, 1)
    span_k = jnp.take_along_axis(full_k, idx, axis=1).reshape(b, nc, e, *k.shape[2:])
    span_v = jnp.take_along_axis(full_v, idx, axis=1).reshape(b, nc, e, *k.shape[2:])
    pos = self._segment(span_k, g, lengths, surprise)  # [B, nc, Q+1]
    reps = jax.vmap(jax.vmap(lambda kk, pp: events.event_reps(kk, pp, self.n_repr)))(span_k, pos)

    # Sinks out of the window and evicted tokens of uncommitted spans (positions L-w-e+2 ..).
    p = lengths[:, None] + jnp.arange(t)  # [B, t] absolute query positions
    committed = jnp.maximum(p - w + 1 - s, 0) // e  # [B, t] spans visible to each query
    ppos = first[:, None] + 1 + jnp.arange(e + t - 1)  # [B, P]
    pend_vis = (
      (ppos[:, None, :] >= s)
      & (ppos[:, None, :] <= p[..., None] - w)
      & (ppos[:, None, :] >= s + committed[..., None] * e)
    )
    sink_vis = jnp.broadcast_to(jnp.arange(s) <= p[..., None] - w, (b, t, s))
    q_far = rotate(q, jnp.full((b, t), w, jnp.int32))  # out-of-window keys sit at distance w

    def at0(y):
      return rotate(y, jnp.zeros(y.shape[:2], jnp.int32))

    gk = jnp.concatenate([at0(sink_k), at0(full_k[:, 1 : e + t])], axis=1)
    gv = jnp.concatenate([sink_v, full_v[:, 1 : e + t]], axis=1)
    vis = jnp.concatenate([sink_vis, pend_vis], -1)
    o_g, lse_g = attend_dense(q_far, gk, gv, vis, d**-0.5)
    o, lse = merge_pair(o, lse, o_g, lse_g)

    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d).sum(3).astype(jnp.float32)
    commit = {"keys": span_k, "values": span_v, "pos": pos, "reps": reps}
    if self.offload:
      rk, rv, rvis = self._host(store, layer, c_prev, ok, commit, qg, committed)
    else:
      stored = self._write(cache, g, ok, commit)
      new |= stored
      n_events = stored["pos"].shape[1] * self.slots
      rk, rv, rvis = retrieve(
        jnp, stored, qg, committed, self.top_k, self.neighbours, self.n_sel(n_events)
      )
    rk = at0(rk.reshape(b, -1, 1, d)).reshape(rk.shape)  # gathered keys sit at 0 as well
    o_r, lse_r = attend_gathered(q_far, rk, rv, rvis, d**-0.5)
    o, _ = merge_pair(o, lse, o_r, lse_r)
    return attn.out(o.astype(x.dtype)), new

  def _segment(self, span_k, g, lengths, surprise):
    """Boundaries ``[B,nc,Q+1]`` of the spans ``g [B,nc]`` (keys ``span_k [B,nc,E,K,Dh]``)."""
    b, nc, e = span_k.shape[:3]
    if self.segmentation == "fixed":
      return jnp.broadcast_to(events.fixed_boundaries(e), (b, nc, 2))
    tau, r = self.surprise_window, self.history
    # history[i] is the surprise of position L - r + i; span g starts at sinks + g*e
    start = self.sinks + g * e - tau - (lengths[:, None] - r)  # [B, nc]
    idx = jnp.clip(start[..., None] + jnp.arange(tau + e), 0, r - 1)
    hist = jnp.take_along_axis(surprise[:, None, :], idx, axis=-1)  # [B, nc, tau+e]
    where = lengths[:, None, None] - r + idx
    valid = (where >= 1) & (start[..., None] + jnp.arange(tau + e) >= 0)
    seg = functools.partial(
      events.segment_span, tau=tau, gamma=self.surprise_gamma, min_event=self.min_event,
      radius=self.refine,
    )  # fmt: skip
    return jax.vmap(jax.vmap(seg))(span_k, hist, valid)

  def _write(self, cache, g, ok, commit):
    """Device store: writes the committed spans at their indices (others are dropped)."""
    m = cache["pos"].shape[1]
    slot = jnp.where(ok, g, m)  # out of range: dropped
    rows = jnp.arange(g.shape[0])[:, None]
    return {
      name: cache[name].at[rows, slot].set(x.astype(cache[name].dtype), mode="drop")
      for name, x in commit.items()
    }

  def _host(self, store, layer, c_prev, ok, commit, qg, committed):
    """Host store: append the committed spans, then score and gather (ordered callbacks)."""
    b, t, kh, d = qg.shape
    e, n_sel = self.block_size, self.n_sel()
    dt = commit["keys"].dtype

    def append(handle, c_prev, ok, keys, values, pos, reps):
      return get_store(handle).append(layer, c_prev, ok, keys, values, pos, reps)

    counts = io_callback(
      append, jax.ShapeDtypeStruct((b,), jnp.int32), store, c_prev, ok, commit["keys"],
      commit["values"], commit["pos"], commit["reps"], ordered=True,
    )  # fmt: skip

    def fetch(handle, counts, qg, committed):
      del counts  # only orders the fetch after the append
      gk, gv, vis = get_store(handle).retrieve(
        layer, qg, committed, self.top_k, self.neighbours, n_sel
      )
      return gk.astype(dt), gv.astype(dt), vis

    kv = jax.ShapeDtypeStruct((b, t, kh, n_sel * e, d), dt)
    out = (kv, kv, jax.ShapeDtypeStruct((b, t, kh, n_sel * e), jnp.bool_))
    return io_callback(fetch, out, store, counts, qg, committed, ordered=True)


def host_shapes(policy: EventMemoryCache, backbone, batch: int) -> dict:
  """Arguments of :func:`zoo.infllm.store.open_store` for ``backbone`` (a Transformer)."""
  attn = backbone.blocks[0].attn
  return {
    "layers": len(backbone.blocks), "batch": batch, "span": policy.block_size,
    "kv_heads": attn.n_kv_heads, "head_dim": attn.head_dim, "slots": policy.slots,
    "n_repr": policy.n_repr, "dtype": np.dtype(backbone.dtype),
  }  # fmt: skip
