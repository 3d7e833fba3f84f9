"""Multi-query associative recall (Zoology / BASED): key-value pairs, then keys asked again."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.errors import InputError
from pipelines.tasks.base import Builder, Example, TaskSource, check_range, check_symbol


class MQAR(TaskSource):
  """``k1 v1 k2 v2 ... kN vN``, then ``Q`` queries ``k v`` scattered over the rest.

  Keys come from the lower half of ``token_range`` (distinct within an example), values from the
  upper half (uniform, so repeats are allowed). Every queried value is one answer span. Queries
  sit at random positions after the pairs; the slots between them hold ``gap_token``.

  Query placement: uniform over the query region (``power_a=None``), or Zoology's MQAR
  generator (used by the BASED paper): the region is cut into 2-token slots and the queried slots
  are drawn without replacement with ``p(slot i) ~ i^(a-1)``, ``i = 1, 2, ...``, so a small ``a``
  (Zoology's default is 0.01) puts most queries soon after the pairs, where a sliding window
  still sees them, and a few far away.

  Metadata: ``query_pos`` int32 ``[Q]`` (the asked key in ``inputs``; its value is the target at
  the same index) and ``pair_pos`` int32 ``[Q]`` (where that key was bound).

  Args:
    length: tokens per example (the query region grows with it, so the gap does too).
    num_pairs: ``N`` key-value pairs (the difficulty, with the length).
    num_queries: ``Q <= N`` distinct keys asked; defaults to ``N``.
    token_range: ``[lo, hi)`` ids used for keys and values (indices into the tokenizer's
      ``drawable_ids()``: byte ids for the byte tokenizer).
    power_a: Zoology's power-law exponent for the query slots (None = uniform positions).
    gap_token: filler between the queries, outside ``token_range`` (default the SEP id).
    seed, num_examples, tokenizer: see ``TaskSource``.
  """

  name = "mqar"

  def __init__(
    self,
    *,
    length: int,
    num_pairs: int = 8,
    num_queries: int | None = None,
    token_range: tuple[int, int] = (0, 256),
    gap_token: int | None = None,
    power_a: float | None = None,
    seed: int = 0,
    num_examples: int = 10_000,
    tokenizer: Any = None,
  ):
    super().__init__(length=length, seed=seed, num_examples=num_examples, tokenizer=tokenizer)
    self.num_pairs = int(num_pairs)
    self.num_queries = self.num_pairs if num_queries is None else int(num_queries)
    if self.num_pairs < 1 or not 1 <= self.num_queries <= self.num_pairs:
      raise InputError(f"mqar: need 1 <= num_queries <= num_pairs, got {num_queries}, {num_pairs}")
    self.lo, self.hi = check_range(self.name, token_range, 2 * self.num_pairs, self.tok)
    self.mid = (self.lo + self.hi) // 2
    self.ids = self.tok.drawable_ids()
    gap = self.tok.sep_id if gap_token is None else gap_token
    self.gap_token = check_symbol(self.name, "gap_token", gap, self.ids[self.lo : self.hi])
    need = 2 * (self.num_pairs + self.num_queries)
    if need > self.length:
      raise InputError(f"mqar: length must be >= {need}, got {self.length}")
    if power_a is not None and not 0 < power_a <= 1:
      raise InputError(f"mqar: power_a must lie in (0, 1] (1 = uniform slots), got {power_a}")
    self.power_a = power_a

  @property
  def chance(self) -> float:
    return 1.0 / (self.hi - self.mid)

  def _example(self, rng: np.random.Generator) -> Example:
    n, q = self.num_pairs, self.num_queries
    keys = self.lo + rng.choice(self.mid - self.lo, n, replace=False)
    values = rng.integers(self.mid, self.hi, n)
    asked = rng.choice(n, q, replace=False)
    region = self.length - 2 * n
    if self.power_a is None:
      # Q blocks of 2 in `region` slots: sorted draws from region - Q, shifted by their rank.
      starts = np.sort(rng.choice(region - q, q, replace=False)) + np.arange(q)
    else:
      slots = region // 2
      p = np.arange(1, slots + 1, dtype=np.float64) ** (self.power_a - 1.0)
      starts = 2 * np.sort(rng.choice(slots, q, replace=False, p=p / p.sum()))
    keys, values = self.ids[keys], self.ids[values]
    b = Builder(self.tok)
    b.add(np.stack([keys, values], 1))
    base = b.pos
    prev = 0
    for start, i in zip(starts, asked):
      b.add(np.full(start - prev, self.gap_token))
      b.add(keys[i : i + 1])
      b.add(values[i : i + 1], answer=True)
      prev = start + 2
    b.add(np.full(region - prev, self.gap_token))
    return b.finish(
      self.length,
      query_pos=(base + starts).astype(np.int32),
      pair_pos=(1 + 2 * asked).astype(np.int32),
    )
