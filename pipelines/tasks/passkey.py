"""Passkey retrieval: a random number hidden in filler at a given depth, asked for at the end."""

from __future__ import annotations

import numpy as np

from pipelines.data.tokenizer import EOS
from pipelines.errors import InputError
from pipelines.tasks.base import (
  Builder,
  Example,
  TaskSource,
  check_corpus,
  check_depth,
  digits,
  encode,
  haystack,
  insert,
)

_QUESTION = "\nWhat is the pass key? The pass key is "


def _needle(key: str) -> str:
  return f"The pass key is {key}. Remember it. {key} is the pass key. "


class Passkey(TaskSource):
  """``"The pass key is NNNNN ..."`` at ``depth`` of the filler; the answer is the digits.

  Metadata: ``depth`` float32 (the needle's actual offset over the filler size, after moving
  back to a sentence start), ``needle_pos`` int32 (where the needle starts in ``inputs``) and
  ``haystack_size`` int32 (filler tokens).

  Args:
    length: tokens per example.
    depth: needle offset as a fraction of the filler; ``None`` draws it per example.
    num_digits: digits of the key (the difficulty; chance is ``10**-num_digits``).
    corpus: optional 1-D byte-token array to draw the filler from (default: repeated
      "The grass is green..." sentences, as in the Landmark Attention paper).
    seed, num_examples: see ``TaskSource``.
  """

  name = "passkey"

  def __init__(
    self,
    *,
    length: int,
    depth: float | None = None,
    num_digits: int = 5,
    corpus: np.ndarray | None = None,
    seed: int = 0,
    num_examples: int = 10_000,
  ):
    super().__init__(length=length, seed=seed, num_examples=num_examples)
    if int(num_digits) < 1:
      raise InputError(f"passkey: num_digits must be >= 1, got {num_digits}")
    self.num_digits = int(num_digits)
    self.depth = check_depth(self.name, depth)
    self.corpus = None if corpus is None else check_corpus(self.name, corpus)
    self._fixed = 2 + len(encode(_needle("0" * self.num_digits) + _QUESTION)) + self.num_digits
    if self._fixed > self.length + 1:
      raise InputError(f"passkey: length must be >= {self._fixed - 1}, got {self.length}")

  @property
  def chance(self) -> float:
    return 10.0**-self.num_digits

  def _example(self, rng: np.random.Generator) -> Example:
    key = digits(rng, self.num_digits)
    depth = rng.uniform() if self.depth is None else self.depth
    size = self.length + 1 - self._fixed
    hay = haystack(rng, size, self.corpus)
    tokens, (pos,), _ = insert(hay, [encode(_needle(key))], [round(depth * size)])
    b = Builder()
    start = b.add(tokens)
    b.add(_QUESTION)
    b.add(key, answer=True)
    b.add([EOS])
    return b.finish(
      self.length,
      depth=np.float32(pos / max(size, 1)),
      needle_pos=np.int32(start + pos),
      haystack_size=np.int32(size),
    )
