"""Set disjointness (JRT, Arora et al. 2024): are two token sets disjoint? Either set first."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.errors import InputError
from pipelines.tasks.base import Builder, Example, TaskSource, check_range, encode

ORDERS = ("small_first", "large_first", "random")
YES, NO = (int(t) for t in encode("YN"))  # byte ids; other tokenizers: their tokens of Y and N


class SetDisjointness(TaskSource):
  """``A SEP B SEP`` (twice with ``repeat``, JRT-Prompt), then ``Y`` if disjoint else ``N``.

  Half the examples are disjoint; the others share exactly one element (the hardest case).
  A recurrent model reading the small set first needs less state (JRT Sec. 3), hence ``order``.
  Examples shorter than ``length`` are right-padded. Metadata: ``label`` int32 (1 disjoint),
  ``small_first`` int32.

  Args:
    length: tokens per example.
    small_size: elements of the small set.
    large_size: elements of the large set; ``None`` fills the length (capped by the range).
    order: ``small_first``, ``large_first`` or ``random`` (per example).
    repeat: show the two sets twice (JRT-Prompt's read-twice context).
    token_range: ``[lo, hi)`` ids the elements are drawn from (indices into the tokenizer's
      ``drawable_ids()``: byte ids for the byte tokenizer).
    seed, num_examples, tokenizer: see ``TaskSource``.
  """

  name = "set_disjointness"

  def __init__(
    self,
    *,
    length: int,
    small_size: int = 4,
    large_size: int | None = None,
    order: str = "small_first",
    repeat: bool = False,
    token_range: tuple[int, int] = (0, 256),
    seed: int = 0,
    num_examples: int = 10_000,
    tokenizer: Any = None,
  ):
    super().__init__(length=length, seed=seed, num_examples=num_examples, tokenizer=tokenizer)
    if order not in ORDERS:
      raise InputError(f"set_disjointness: order must be one of {ORDERS}, got {order!r}")
    self.order, self.repeat = order, bool(repeat)
    self.small_size = int(small_size)
    copies = 2 if self.repeat else 1
    room = (self.length - 2) // copies - 2
    lo, hi = check_range(self.name, token_range, 1, self.tok)
    if large_size is None:
      large_size = min(room - self.small_size, hi - lo - self.small_size)
    self.large_size = int(large_size)
    if not 1 <= self.small_size <= self.large_size:
      raise InputError(
        f"set_disjointness: need 1 <= small_size <= large_size, got {small_size}, {large_size}"
        f" (length={length} leaves room for {room} elements)"
      )
    if self.small_size + self.large_size > room:
      raise InputError(f"set_disjointness: sets of {small_size}+{large_size} exceed {length}")
    self.lo, self.hi = check_range(
      self.name, token_range, self.small_size + self.large_size, self.tok
    )
    self.ids = self.tok.drawable_ids()
    self.yes_no = []
    for letter in "YN":
      ids = self.tok.encode(letter)
      if ids.size != 1:
        raise InputError(f"set_disjointness: {letter!r} is {ids.size} tokens; one is needed")
      self.yes_no.append(int(ids[0]))

  @property
  def chance(self) -> float:
    return 0.5

  def _example(self, rng: np.random.Generator) -> Example:
    s, n = self.small_size, self.large_size
    pool = self.ids[self.lo + rng.choice(self.hi - self.lo, s + n, replace=False)]
    small, large = pool[:s], pool[s:].copy()
    disjoint = rng.random() < 0.5
    if not disjoint:
      large[rng.integers(n)] = small[rng.integers(s)]
    small_first = {"small_first": True, "large_first": False}.get(self.order, rng.random() < 0.5)
    first, second = (small, large) if small_first else (large, small)
    b = Builder(self.tok)
    for _ in range(2 if self.repeat else 1):
      b.add(first)
      b.add([self.tok.sep_id])
      b.add(second)
      b.add([self.tok.sep_id])
    b.add([self.yes_no[0] if disjoint else self.yes_no[1]], answer=True)
    b.add([self.tok.eos_id])
    return b.finish(self.length, label=np.int32(disjoint), small_first=np.int32(small_first))
