"""Attention masks: the `Mask` dataclass, per-head normalisation and block-range helpers.

Positions are absolute key positions: query row ``i`` sits at ``p = q_offset + i``. Key ``j`` is
visible to ``p`` iff (``causal`` -> ``j <= p``) and (``window`` w -> ``p - j < w`` or
``j < sinks``), or, with ``prefix`` P, both ``p < P`` and ``j < P`` (bidirectional prompt).
A window bounds how far back a query reaches, so it needs ``causal=True``: a non-causal mask with
a window is refused (it would bound the past and leave the future unbounded).

``mask=None`` has one meaning at every entry point (``dot_product_attention``,
``decode_attention``, ``ring_attention``): no mask, every key visible (in decoding, every valid
cache entry), i.e. ``Mask(causal=False)``. Causal attention is always asked for with ``Mask()``.

The block helpers describe the visible keys of a run of queries as at most two key ranges, a
*head* ``[0, head)`` (sinks and prefix) and a *band* ``[lo, hi)`` (causal/window), so kernels
iterate only over key blocks that can hold a visible key. They accept Python ints or traced
int32 scalars, so the same code serves static (XLA) and dynamic (Pallas scalar prefetch) use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# A window larger than any sequence; used when a mask is encoded as integers.
NO_WINDOW = 2**30


@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys a query may see (see module docstring for the exact rule).

  Attributes:
    causal: keys after the query position are hidden.
    window: if set, keys at distance ``>= window`` behind the query are hidden (sinks excepted);
      needs ``causal=True``.
    sinks: the first ``sinks`` keys stay visible whatever the window (StreamingLLM).
    prefix: keys and queries before ``prefix`` see each other bidirectionally (prefix-LM).
  """

  causal: bool = True
  window: int | None = None
  sinks: int = 0
  prefix: int = 0

  def __post_init__(self):
    if not isinstance(self.causal, bool):
      raise ValueError(f"Mask.causal must be a bool, got {self.causal!r}")
    if self.window is not None and (not _is_int(self.window) or self.window < 1):
      raise ValueError(f"Mask.window must be an int >= 1 or None, got {self.window!r}")
    if self.window is not None and not self.causal:
      raise ValueError(
        f"Mask(causal=False, window={self.window}): a window bounds only the past, so it needs "
        "causal=True (a non-causal window would leave every future key visible)"
      )
    if not _is_int(self.sinks) or self.sinks < 0:
      raise ValueError(f"Mask.sinks must be an int >= 0, got {self.sinks!r}")
    if not _is_int(self.prefix) or self.prefix < 0:
      raise ValueError(f"Mask.prefix must be an int >= 0, got {self.prefix!r}")

  @property
  def is_full(self) -> bool:
    """True when every key is visible to every query."""
    return not self.causal and self.window is None

  def visible(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Dense visibility; ``q_pos`` and ``k_pos`` broadcast against each other.

    Args:
      q_pos: int array of query positions, e.g. ``[T, 1]``.
      k_pos: int array of key positions, e.g. ``[1, S]``.

    Returns:
      bool array of the broadcast shape, e.g. ``[T, S]``.
    """
    q_pos = jnp.asarray(q_pos)
    k_pos = jnp.asarray(k_pos)
    ok = jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=bool)
    if self.causal:
      ok = ok & (k_pos <= q_pos)
    if self.window is not None:
      ok = ok & ((q_pos - k_pos < self.window) | (k_pos < self.sinks))
    if self.prefix:
      ok = ok | ((q_pos < self.prefix) & (k_pos < self.prefix))
    return ok

  def key_ranges(self, p_lo, p_hi, num_keys):
    """Key ranges that may hold a visible key for some query position in ``[p_lo, p_hi)``.

    Args:
      p_lo: first query position (int or int32 scalar).
      p_hi: one past the last query position (``p_hi > p_lo``).
      num_keys: S.

    Returns:
      ``(head, lo, hi)``: keys in ``[0, head)`` and ``[lo, hi)`` may be visible, no other key is;
      ``head <= lo <= hi <= num_keys`` so the two ranges never overlap.
    """
    mx, mn = _max_fn(p_lo, p_hi), _min_fn(p_lo, p_hi)
    hi = mn(p_hi, num_keys) if self.causal else num_keys
    lo = mx(p_lo - self.window + 1, 0) if self.window is not None else 0
    head = 0
    if self.window is not None and self.sinks:
      head = mn(self.sinks, num_keys)
    if self.prefix:
      # Queries inside the prompt see the whole prompt; only they reach past the causal limit.
      in_prefix = p_lo < self.prefix
      reach = mn(self.prefix, num_keys)
      hi = _where(in_prefix, mx(hi, reach), hi)
      head = _where(in_prefix, mx(head, reach), head)
    hi = mx(hi, 0)
    lo = mn(mx(lo, head), mx(hi, head))
    hi = mx(hi, lo)
    return head, lo, hi

  def key_block_ranges(self, p_lo, p_hi, num_keys, block_k):
    """Like :meth:`key_ranges` but in key blocks of size ``block_k`` (disjoint, ceil-rounded).

    Returns:
      ``(head_blocks, lo_block, hi_block)``: blocks ``[0, head_blocks)`` and
      ``[lo_block, hi_block)``; ``head_blocks <= lo_block <= hi_block <= ceil(S / block_k)``.
    """
    mx, mn = _max_fn(p_lo, p_hi), _min_fn(p_lo, p_hi)
    head, lo, hi = self.key_ranges(p_lo, p_hi, num_keys)
    head_b = (head + block_k - 1) // block_k
    hi_b = (hi + block_k - 1) // block_k
    lo_b = mn(mx(lo // block_k, head_b), mx(hi_b, head_b))
    hi_b = mx(hi_b, lo_b)
    return head_b, lo_b, hi_b

  def as_array(self) -> jax.Array:
    """int32 ``[4]``: (causal, window or NO_WINDOW, sinks, prefix), for kernels' scalar tables."""
    window = NO_WINDOW if self.window is None else self.window
    return jnp.array([int(self.causal), window, self.sinks, self.prefix], dtype=jnp.int32)


def normalize_masks(mask: Mask | Sequence[Mask] | None, num_heads: int) -> tuple[Mask, ...]:
  """Expands the public ``mask`` argument to one Mask per query head.

  Args:
    mask: ``None`` (no mask: every key visible), one Mask, or a tuple of G Masks with
      ``num_heads % G == 0``; mask ``g`` applies to heads ``[g * H // G, (g + 1) * H // G)``.
    num_heads: H.

  Returns:
    tuple of H masks.
  """
  if mask is None:
    return (Mask(causal=False),) * num_heads
  if isinstance(mask, Mask):
    return (mask,) * num_heads
  masks = tuple(mask)
  if not masks or not all(isinstance(m, Mask) for m in masks):
    raise ValueError(f"mask must be a Mask or a non-empty tuple of Mask, got {mask!r}")
  if num_heads % len(masks):
    raise ValueError(
      f"{len(masks)} masks do not divide H={num_heads} query heads: give one Mask per head "
      "or per equal group of heads"
    )
  per = num_heads // len(masks)
  return tuple(m for m in masks for _ in range(per))


def mask_table(masks: Sequence[Mask]) -> jax.Array:
  """int32 ``[H, 4]`` rows of :meth:`Mask.as_array`, one per head."""
  return jnp.stack([m.as_array() for m in masks])


def head_groups(masks: Sequence[Mask]) -> list[tuple[Mask, list[int]]]:
  """Groups head indices by identical Mask, in order of first appearance."""
  groups: dict[Mask, list[int]] = {}
  for h, m in enumerate(masks):
    groups.setdefault(m, []).append(h)
  return list(groups.items())


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _static(*xs) -> bool:
  return all(isinstance(x, int) for x in xs)


def _max_fn(*xs):
  return max if _static(*xs) else jnp.maximum


def _min_fn(*xs):
  return min if _static(*xs) else jnp.minimum


def _where(c, a, b):
  if isinstance(c, bool):
    return a if c else b
  return jnp.where(c, a, b)
