"""Sequence-order recall (SORT, Pink et al. 2024): which of two segments of the text came first?"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.errors import InputError
from pipelines.tasks.base import (
  Builder,
  Example,
  TaskSource,
  check_corpus,
  encode,
  encode_qa,
  haystack,
)

_ASK_TEXT = "\n\nWhich of these two segments came first in the text?\nA: "
_ANSWER_TEXT = "\nAnswer: "
LABELS = (int(encode("A")[0]), int(encode("B")[0]))  # byte ids


class SequenceOrder(TaskSource):
  """A window of ``corpus``, then two of its segments labelled A and B in random order.

  The answer is the label of the segment that appeared first. Metadata: ``label`` int32 (0 when
  A came first), ``first_pos`` and ``second_pos`` int32 (the segments' starts in ``inputs``).

  Args:
    length: tokens per example.
    corpus: 1-D token array (``tokenizer``'s ids) the text is a window of.
    segment_length: tokens per segment.
    min_gap: fewest text tokens between the end of the first segment and the second.
    seed, num_examples, tokenizer: see ``TaskSource``.
  """

  name = "sequence_order"

  def __init__(
    self,
    *,
    length: int,
    corpus: np.ndarray,
    segment_length: int = 16,
    min_gap: int = 0,
    seed: int = 0,
    num_examples: int = 10_000,
    tokenizer: Any = None,
  ):
    super().__init__(length=length, seed=seed, num_examples=num_examples, tokenizer=tokenizer)
    self.corpus = check_corpus(self.name, corpus, self.tok)
    self.segment_length, self.min_gap = int(segment_length), int(min_gap)
    if self.segment_length < 1 or self.min_gap < 0:
      raise InputError(f"sequence_order: bad segment_length={segment_length}/min_gap={min_gap}")
    self._ask, self._b = self.tok.encode(_ASK_TEXT), self.tok.encode("\nB: ")
    # "\nAnswer: A" is one text; the label's tokens are the answer.
    self._qa = [encode_qa(self.tok, [(_ANSWER_TEXT, False), (x, True)]) for x in "AB"]
    qa = max(len(ids) for ids, _ in self._qa)
    self._text = self.length + 1 - 2 - self._ask.size - self._b.size - qa - 2 * segment_length
    self._slack = self._text - 2 * self.segment_length - self.min_gap
    if self._slack < 0:
      raise InputError(f"sequence_order: length must be >= {self.length - self._slack}")

  @property
  def chance(self) -> float:
    return 0.5

  def _example(self, rng: np.random.Generator) -> Example:
    m = self.segment_length
    text = haystack(rng, self._text, self.corpus, self.tok)
    # Repetitive text can make both segments equal, and then order is undefined: redraw.
    for _ in range(100):
      x, y = np.sort(rng.integers(0, self._slack + 1, 2))
      i, j = int(x), int(y) + m + self.min_gap
      if not np.array_equal(text[i : i + m], text[j : j + m]):
        break
    else:
      raise InputError("sequence_order: corpus too repetitive to draw distinct segments")
    a_first = rng.random() < 0.5
    seg_a, seg_b = (
      (text[i : i + m], text[j : j + m]) if a_first else (text[j : j + m], text[i : i + m])
    )
    b = Builder(self.tok)
    start = b.add(text)
    for piece in (self._ask, seg_a, self._b, seg_b):
      b.add(piece)
    b.add_encoded(*self._qa[0 if a_first else 1])
    b.add([self.tok.eos_id])
    return b.finish(
      self.length,
      label=np.int32(not a_first),
      first_pos=np.int32(start + i),
      second_pos=np.int32(start + j),
    )
