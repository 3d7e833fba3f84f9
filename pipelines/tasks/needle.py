"""Needle-in-a-haystack (RULER-style): key -> number needles in a corpus haystack.

Variants: ``single`` (one needle), ``multi_key`` (distractor needles with other keys, one asked),
``multi_value`` (one key with several numbers, all asked, in order of appearance) and
``multi_query`` (several keys, several asked).
"""

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

VARIANTS = ("single", "multi_key", "multi_value", "multi_query")

_ADJECTIVES = (
  "amber azure brisk calm dusty eager fuzzy gentle hollow icy jolly lucky misty noble quiet rusty"
).split()
_NOUNS = (
  "badger cactus dragon falcon glacier harbor island jackal lantern meadow otter pepper "
  "quartz river saddle tundra"
).split()
KEYS = tuple(f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS)


def _needle(key: str, value: str) -> str:
  return f"One of the special magic numbers for {key} is: {value}. "


def _question(variant: str, keys: list[str]) -> str:
  if variant == "multi_value":
    return f"\nQuestion: What are all the special magic numbers for {keys[0]}?\nAnswer: "
  if variant == "multi_query":
    return f"\nQuestion: What are the special magic numbers for {', '.join(keys)}?\nAnswer: "
  return f"\nQuestion: What is the special magic number for {keys[0]}?\nAnswer: "


class Needle(TaskSource):
  """Numbers hidden in a haystack drawn from ``corpus``; one answer span per asked number.

  One needle (the asked one; the first asked for multi_query; one of the values for
  multi_value) sits at ``depth`` of the haystack, the others at uniform random offsets.
  Metadata: ``depth`` float32 (that needle's actual offset over the haystack size, after moving
  back to a line/sentence start), ``needle_pos`` int32 (its start in ``inputs``) and
  ``span_needle_pos`` int32 ``[num_spans]`` (where the needle holding each answer span starts)
  and ``haystack_size`` int32 (haystack tokens).

  Args:
    length: tokens per example.
    corpus: 1-D token array (``tokenizer``'s ids) the haystacks are windows of.
    variant: one of ``VARIANTS``.
    depth: offset of the needle described above as a fraction of the haystack; ``None`` draws
      it per example.
    num_needles: needles in the haystack (keys for multi_key/multi_query, values for
      multi_value); ignored by ``single``.
    num_queries: keys asked by ``multi_query``.
    value_digits: digits per number (chance is ``10**-value_digits`` per span).
    seed, num_examples, tokenizer: see ``TaskSource``.
  """

  name = "needle"

  def __init__(
    self,
    *,
    length: int,
    corpus: np.ndarray,
    variant: str = "single",
    depth: float | None = None,
    num_needles: int = 4,
    num_queries: int = 2,
    value_digits: int = 7,
    seed: int = 0,
    num_examples: int = 10_000,
    tokenizer: Any = None,
  ):
    super().__init__(length=length, seed=seed, num_examples=num_examples, tokenizer=tokenizer)
    if variant not in VARIANTS:
      raise InputError(f"needle: variant must be one of {VARIANTS}, got {variant!r}")
    self.variant = variant
    self.corpus = check_corpus(self.name, corpus, self.tok)
    self.depth = check_depth(self.name, depth)
    self.num_needles = 1 if variant == "single" else int(num_needles)
    self.num_queries = {"multi_query": int(num_queries), "multi_value": self.num_needles}.get(
      variant, 1
    )
    self.value_digits = int(value_digits)
    if not 1 <= self.num_needles <= len(KEYS):
      raise InputError(f"needle: num_needles must be in [1, {len(KEYS)}], got {num_needles}")
    if not 1 <= self.num_queries <= self.num_needles:
      raise InputError(f"needle: num_queries must be in [1, num_needles], got {num_queries}")
    if self.value_digits < 1:
      raise InputError(f"needle: value_digits must be >= 1, got {value_digits}")
    enc = self.tok.encode
    longest = max(KEYS, key=lambda k: (len(enc(k)), len(k)))
    value = "0" * self.value_digits
    self._max_fixed = (
      2
      + len(enc(_needle(longest, value))) * self.num_needles
      + len(enc(_question(variant, [longest] * self.num_queries)))
      + len(enc(", ".join([value] * self.num_queries)))
    )
    if self.tok is not BYTES:  # digits may take up to a token each, keys a few tokens more
      self._max_fixed += (self.num_needles + self.num_queries) * (self.value_digits + 4)
    if self._max_fixed > self.length + 1:
      raise InputError(f"needle: length must be >= {self._max_fixed - 1}, got {self.length}")

  @property
  def chance(self) -> float:
    return 10.0**-self.value_digits

  def _qa(self, question: str, values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    parts = [(question, False)]
    for j, v in enumerate(values):
      parts += ([(", ", False)] if j else []) + [(v, True)]
    return encode_qa(self.tok, parts)

  def _example(self, rng: np.random.Generator) -> Example:
    n, q = self.num_needles, self.num_queries
    keys = [KEYS[i] for i in rng.choice(len(KEYS), n, replace=False)]
    if self.variant == "multi_value":
      keys = keys[:1] * n
    values = [digits(rng, self.value_digits) for _ in range(n)]
    needles = [self.tok.encode(_needle(k, v)) for k, v in zip(keys, values)]
    fixed_q = keys[:1] if self.variant == "multi_value" else keys[:q]
    question = _question(self.variant, fixed_q)
    # The question and the answers are one text, encoded once (answers in the asked order,
    # which for multi_value is known only after placement: sized here in index order, with a
    # token of slack per answer for subword tokenizers, whose merges could differ by order).
    qa_size = len(self._qa(question, values[:q])[0]) + (0 if self.tok is BYTES else q)
    size = self.length + 1 - 2 - sum(x.size for x in needles) - qa_size
    depth = rng.uniform() if self.depth is None else self.depth
    offsets = [round(depth * size)] + list(rng.integers(0, size + 1, n - 1))
    order = np.argsort(offsets, kind="stable")
    hay = haystack(rng, size, self.corpus, self.tok)
    tokens, starts, snapped = insert(
      hay, [needles[i] for i in order], [offsets[i] for i in order], tok=self.tok
    )
    pos, hay_off = np.empty(n, np.int64), np.empty(n, np.int64)
    pos[order], hay_off[order] = starts, snapped
    # Multi-value answers in order of appearance; otherwise in the order the keys are asked.
    asked = list(order) if self.variant == "multi_value" else list(range(q))
    b = Builder(self.tok)
    first = b.add(tokens)
    b.add_encoded(*self._qa(question, [values[i] for i in asked]))
    b.add([self.tok.eos_id])
    return b.finish(
      self.length,
      depth=np.float32(hay_off[0] / max(size, 1)),
      needle_pos=np.int32(first + pos[0]),
      haystack_size=np.int32(size),
      span_needle_pos=np.asarray([first + pos[i] for i in asked], np.int32),
    )
