"""Passkey retrieval: a random number hidden in filler at a given depth, asked for at the end."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.errors import InputError
from pipelines.tasks.base import (
  BYTES,
  Builder,
  Example,
  TaskSource,
  check_corpus,
  check_depth,
  digits,
  encode_qa,
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
    corpus: optional 1-D token array (of ``tokenizer``'s ids) to draw the filler from (default:
      repeated "The grass is green..." sentences, as in the Landmark Attention paper).
    seed, num_examples, tokenizer: see ``TaskSource``.
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
    tokenizer: Any = None,
  ):
    super().__init__(length=length, seed=seed, num_examples=num_examples, tokenizer=tokenizer)
    if int(num_digits) < 1:
      raise InputError(f"passkey: num_digits must be >= 1, got {num_digits}")
    self.num_digits = int(num_digits)
    self.depth = check_depth(self.name, depth)
    self.corpus = None if corpus is None else check_corpus(self.name, corpus, self.tok)
    enc = self.tok.encode
    self._fixed = 2 + len(enc(_needle("0" * self.num_digits) + _QUESTION)) + self.num_digits
    if self.tok is not BYTES:  # digits may take up to a token each wherever they appear
      self._fixed = 2 + len(enc(_needle("") + _QUESTION)) + 3 * self.num_digits + 2
    if self._fixed > self.length + 1:
      raise InputError(f"passkey: length must be >= {self._fixed - 1}, got {self.length}")

  @property
  def chance(self) -> float:
    return 10.0**-self.num_digits

  def _example(self, rng: np.random.Generator) -> Example:
    key = digits(rng, self.num_digits)
    depth = rng.uniform() if self.depth is None else self.depth
    needle = self.tok.encode(_needle(key))
    qa = encode_qa(self.tok, [(_QUESTION, False), (key, True)])
    # Exactly `length + 1` tokens: start, filler with the needle, question + answer, EOS.
    size = self.length + 1 - 2 - needle.size - qa[0].size
    hay = haystack(rng, size, self.corpus, self.tok)
    tokens, (pos,), _ = insert(hay, [needle], [round(depth * size)], tok=self.tok)
    b = Builder(self.tok)
    start = b.add(tokens)
    b.add_encoded(*qa)
    b.add([self.tok.eos_id])
    return b.finish(
      self.length,
      depth=np.float32(pos / max(size, 1)),
      needle_pos=np.int32(start + pos),
      haystack_size=np.int32(size),
    )
