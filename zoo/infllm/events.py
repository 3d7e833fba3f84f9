"""EM-LLM event segmentation of one memory span (Fountas et al. 2024, "Human-like Episodic
Memory for Infinite Context LLMs").

A span is ``E`` consecutive memory tokens (``E = block_size``); it is cut into at most
``Q = E // min_event`` events, each at least ``min_event`` tokens long:

1. surprise boundaries: token ``i`` opens a new event when its surprise ``-log p(x_i|x_<i)``
   exceeds ``mean + gamma * std`` of the ``tau`` surprises before it (EM-LLM Eq. 1), kept
   greedily left to right when the events they create stay ``>= min_event`` long;
2. refinement: with the key-similarity graph ``A`` of the span, each boundary in turn moves
   within ``radius`` tokens to the position that maximises the modularity of the induced
   segmentation (coordinate ascent: the current position is a candidate, so modularity never
   decreases).

Boundaries are represented as ``pos [Q+1]`` int32: ``pos[0] = 0``, then the boundaries in
increasing order, padded with ``E``; event ``j`` is ``[pos[j], pos[j+1])`` and is empty (an
unused slot) when ``pos[j] = E``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def surprise_flags(history: jax.Array, valid: jax.Array, tau: int, gamma: float) -> jax.Array:
  """Raw surprise boundaries of a span.

  Args:
    history: ``[tau + E]`` float32 surprises; entries ``tau..`` are the span's tokens, the
      first ``tau`` the tokens before it.
    valid: ``[tau + E]`` bool, False where a surprise is undefined (position 0, before the
      stream).
    tau: surprise window (tokens before ``i`` that set its threshold).
    gamma: threshold in standard deviations.

  Returns:
    ``[E]`` bool: token ``i`` is more surprising than ``mean + gamma * std`` of its window
    (population std over the valid entries; no valid entry -> no boundary).
  """
  e = history.shape[0] - tau
  idx = jnp.arange(e)[:, None] + jnp.arange(tau)[None, :]  # [E, tau] window of token i
  win, ok = history[idx], valid[idx]
  n = ok.sum(-1)
  mean = jnp.where(ok, win, 0.0).sum(-1) / jnp.maximum(n, 1)
  var = jnp.where(ok, (win - mean[:, None]) ** 2, 0.0).sum(-1) / jnp.maximum(n, 1)
  s = history[tau:]
  return valid[tau:] & (n > 0) & (s > mean + gamma * jnp.sqrt(var))


def greedy_boundaries(flags: jax.Array, min_event: int, slots: int) -> jax.Array:
  """``flags [E]`` -> ``pos [slots+1]``: flagged tokens kept left to right when the event
  they close and the remainder of the span both keep ``>= min_event`` tokens."""
  e = flags.shape[0]

  def body(last, i):
    keep = flags[i] & (i - last >= min_event) & (e - i >= min_event) & (i > 0)
    return jnp.where(keep, i, last), keep

  _, keep = jax.lax.scan(body, jnp.int32(0), jnp.arange(e, dtype=jnp.int32))
  inner = jnp.sort(jnp.where(keep, jnp.arange(e, dtype=jnp.int32), e))[: slots - 1]
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), inner, jnp.full((1,), e, jnp.int32)])


def key_adjacency(keys: jax.Array) -> jax.Array:
  """``keys [E,K,Dh]`` -> ``A [E,E]`` float32: cosine similarity of the keys, averaged over KV
  heads, clipped at 0 (modularity needs non-negative edge weights; EM-LLM uses key
  similarity as the graph)."""
  k = keys.astype(jnp.float32)
  k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
  return jnp.maximum(jnp.einsum("ikd,jkd->ij", k, k) / k.shape[1], 0.0)


def labels_of(pos: jax.Array, e: int) -> jax.Array:
  """``pos [Q+1]`` -> ``[E]`` int32 event index of each token."""
  return jnp.sum(pos[1:-1][None, :] <= jnp.arange(e)[:, None], axis=-1).astype(jnp.int32)


def modularity(adj: jax.Array, labels: jax.Array) -> jax.Array:
  """Newman modularity ``(1/2m) sum_ij (A_ij - k_i k_j / 2m) [c_i = c_j]`` of ``labels [E]``."""
  deg = adj.sum(-1)
  two_m = jnp.maximum(deg.sum(), 1e-12)
  same = labels[:, None] == labels[None, :]
  return jnp.sum(jnp.where(same, adj - deg[:, None] * deg[None, :] / two_m, 0.0)) / two_m


def refine_boundaries(adj: jax.Array, pos: jax.Array, radius: int, min_event: int) -> jax.Array:
  """Moves each boundary of ``pos [Q+1]`` (in order) within ``+-radius`` to maximise
  ``modularity(adj, ...)``, keeping events ``>= min_event``; ties keep the current place."""
  e, q = adj.shape[0], pos.shape[0] - 1
  # candidate order 0, -1, +1, -2, ...: argmax picks the first best, so a tie never moves
  shifts = jnp.array([0] + [s * d for d in range(1, radius + 1) for s in (-1, 1)], jnp.int32)

  def body(k, pos):
    here = pos[k]
    cand = here + shifts
    ok = (cand - pos[k - 1] >= min_event) & (pos[k + 1] - cand >= min_event) & (here < e)
    ok = ok.at[0].set(True)

    def score(c):
      return modularity(adj, labels_of(pos.at[k].set(c), e))

    gains = jnp.where(ok, jax.vmap(score)(cand), -jnp.inf)
    return pos.at[k].set(cand[jnp.argmax(gains)])

  return jax.lax.fori_loop(1, q, body, pos)


def segment_span(
  keys: jax.Array,
  history: jax.Array,
  valid: jax.Array,
  *,
  tau: int,
  gamma: float,
  min_event: int,
  radius: int,
) -> jax.Array:
  """Boundaries ``pos [Q+1]`` of one span (``keys [E,K,Dh]``, surprises as in
  :func:`surprise_flags`), ``Q = E // min_event``."""
  e = keys.shape[0]
  pos = greedy_boundaries(surprise_flags(history, valid, tau, gamma), min_event, e // min_event)
  if radius:
    pos = refine_boundaries(key_adjacency(keys), pos, radius, min_event)
  return pos


def event_reps(keys: jax.Array, pos: jax.Array, n_repr: int) -> jax.Array:
  """Representative keys of each event of a span: its ``n_repr`` keys most aligned with the
  event's mean key (per KV head), as InfLLM does for a fixed block.

  Args:
    keys: ``[E,K,Dh]``; pos: ``[Q+1]`` boundaries (events shorter than ``n_repr`` must not
      occur; empty slots give arbitrary keys and are masked by the caller).

  Returns:
    ``[Q, n_repr, K, Dh]`` in ``keys.dtype``.
  """
  e = keys.shape[0]
  x = keys.astype(jnp.float32)
  i = jnp.arange(e)
  member = (i[None, :] >= pos[:-1, None]) & (i[None, :] < pos[1:, None])  # [Q, E]
  count = jnp.maximum(member.sum(-1), 1)[:, None, None]
  centroid = jnp.einsum("qe,ekd->qkd", member.astype(jnp.float32), x) / count  # [Q, K, Dh]
  fit = jnp.einsum("ekd,qkd->qke", x, centroid)
  fit = jnp.where(member[:, None, :], fit, -jnp.inf)
  _, pick = jax.lax.top_k(fit, n_repr)  # [Q, K, r]
  picked = x[pick, jnp.arange(x.shape[1])[None, :, None]]  # [Q, K, r, Dh]
  return jnp.moveaxis(picked, 2, 1).astype(keys.dtype)


def fixed_boundaries(e: int) -> jax.Array:
  """The one-event segmentation of InfLLM's fixed blocks: ``[0, E]``."""
  return jnp.array([0, e], jnp.int32)
