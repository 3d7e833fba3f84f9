"""Selective copying (Mamba Sec. 4.1.1): copy the data tokens scattered among blanks, in order."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.errors import InputError
from pipelines.tasks.base import Builder, Example, TaskSource, check_range, check_symbol


class SelectiveCopy(TaskSource):
  """A region of blanks holding ``M`` data tokens at random positions, SEP, then the data again.

  Each copied token is one answer span, so the per-example score is the fraction copied right.
  Metadata: ``data_pos`` int32 ``[M]``, the data tokens' positions in ``inputs``.

  Args:
    length: tokens per example (the region fills what the answer leaves).
    num_tokens: ``M`` data tokens to copy.
    token_range: ``[lo, hi)`` data-token ids (default the 16 bytes ``a``..``p``; indices into
      the tokenizer's ``drawable_ids()``, which are the byte ids for the byte tokenizer).
    blank_token: the filler id, outside ``token_range`` (default the token of ``.``).
    seed, num_examples, tokenizer: see ``TaskSource``.
  """

  name = "selective_copy"

  def __init__(
    self,
    *,
    length: int,
    num_tokens: int = 16,
    token_range: tuple[int, int] = (97, 113),
    blank_token: int | None = None,
    seed: int = 0,
    num_examples: int = 10_000,
    tokenizer: Any = None,
  ):
    super().__init__(length=length, seed=seed, num_examples=num_examples, tokenizer=tokenizer)
    self.num_tokens = int(num_tokens)
    self.lo, self.hi = check_range(self.name, token_range, 1, self.tok)
    self.ids = self.tok.drawable_ids()
    blank = int(self.tok.encode(".")[0]) if blank_token is None else blank_token
    self.blank_token = check_symbol(self.name, "blank_token", blank, self.ids[self.lo : self.hi])
    self._region = self.length - 2 - self.num_tokens
    if self.num_tokens < 1 or self._region < self.num_tokens:
      raise InputError(
        f"selective_copy: length must be >= {2 + 2 * self.num_tokens} for "
        f"num_tokens={num_tokens}, got {self.length}"
      )

  @property
  def chance(self) -> float:
    return 1.0 / (self.hi - self.lo)

  def _example(self, rng: np.random.Generator) -> Example:
    pos = np.sort(rng.choice(self._region, self.num_tokens, replace=False))
    data = self.ids[rng.integers(self.lo, self.hi, self.num_tokens)]
    region = np.full(self._region, self.blank_token)
    region[pos] = data
    b = Builder(self.tok)
    start = b.add(region)
    b.add([self.tok.sep_id])
    for token in data:
      b.add([token], answer=True)
    b.add([self.tok.eos_id])
    return b.finish(self.length, data_pos=(start + pos).astype(np.int32))
