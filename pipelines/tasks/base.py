"""The shared shape of every synthetic task: a deterministic grain random-access source.

Every example is a dict of numpy arrays of one fixed length ``T``:

- ``inputs`` int32 ``[T]`` and ``targets`` int32 ``[T]``: one token stream ``full`` of ``T + 1``
  tokens (it starts with BOS) read as ``inputs = full[:-1]``, ``targets = full[1:]``;
- ``loss_mask`` float32 ``[T]``: 1 exactly where ``targets`` is an answer token;
- ``segment_ids`` int32 ``[T]``: 1 on the example, 0 on right padding (PAD tokens);
- ``answer_spans`` int32 ``[T]``: 0 off the answer, ``k >= 1`` on the target positions of the
  ``k``-th answer span (one span per value to recall, scored by exact match);
- ``answer_start`` int32: the first target index of the answer, ``num_spans`` int32;
- task metadata with fixed shapes (so examples batch), documented per task.

A position in ``inputs`` equals the index in ``full``; the target predicting ``full[p]`` is at
index ``p - 1``.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from pipelines.data.tokenizer import BOS, PAD, VOCAB_SIZE, ByteTokenizer
from pipelines.errors import InputError

Example = dict[str, Any]


_TOKENIZER = ByteTokenizer()
encode = _TOKENIZER.encode  # text -> int32 byte ids
decode = _TOKENIZER.decode  # ids -> text, special tokens dropped


class Builder:
  """Accumulates the ``full`` token stream of one example with answer-span labels."""

  def __init__(self):
    self._ids: list[np.ndarray] = [np.array([BOS], np.int32)]
    self._spans: list[np.ndarray] = [np.zeros(1, np.int32)]
    self.pos = 1
    self.num_spans = 0

  def add(self, ids: np.ndarray | str, *, answer: bool = False) -> int:
    """Appends tokens (a string is UTF-8 encoded); returns the ``full`` index they start at.

    With ``answer=True`` the tokens form the next answer span.
    """
    ids = encode(ids) if isinstance(ids, str) else np.asarray(ids, np.int32).ravel()
    start = self.pos
    if answer:
      self.num_spans += 1
    self._ids.append(ids)
    self._spans.append(np.full(ids.shape, self.num_spans if answer else 0, np.int32))
    self.pos += ids.size
    return start

  def finish(self, length: int, **meta: Any) -> Example:
    """Pads (PAD, segment 0) to ``length + 1`` tokens and splits into inputs and targets."""
    full = np.concatenate(self._ids)
    spans = np.concatenate(self._spans)
    if full.size > length + 1:
      raise InputError(f"example needs {full.size - 1} tokens but length={length}")
    pad = length + 1 - full.size
    segment = np.concatenate([np.ones(full.size, np.int32), np.zeros(pad, np.int32)])
    full = np.concatenate([full, np.full(pad, PAD, np.int32)])
    spans = np.concatenate([spans, np.zeros(pad, np.int32)])[1:]
    if self.num_spans == 0:
      raise InputError("an example needs at least one answer span")
    out = {
      "inputs": full[:-1],
      "targets": full[1:],
      "loss_mask": (spans > 0).astype(np.float32),
      "segment_ids": segment[:-1],
      "answer_spans": spans,
      "answer_start": np.int32(np.argmax(spans > 0)),
      "num_spans": np.int32(self.num_spans),
    }
    out.update(meta)
    return out


class TaskSource:
  """Base of all tasks: ``len`` examples, example ``i`` drawn from ``default_rng((seed, i))``.

  Subclasses set ``name`` and implement ``_example(rng) -> Example`` and ``chance``.

  Args:
    length: ``T``, the number of input (and target) tokens of every example.
    seed: the source seed; with the index it fixes the example.
    num_examples: the reported ``len`` (examples are procedural, any count works).
  """

  name = "task"

  def __init__(self, *, length: int, seed: int = 0, num_examples: int = 10_000):
    if int(length) < 2:
      raise InputError(f"{self.name}: length must be >= 2, got {length}")
    if int(num_examples) < 1:
      raise InputError(f"{self.name}: num_examples must be >= 1, got {num_examples}")
    self.length = int(length)
    self.seed = int(seed)
    self.num_examples = int(num_examples)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Example:
    index = operator.index(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"{self.name}: index {index} outside [0, {self.num_examples})")
    return self._example(np.random.default_rng((self.seed, index)))

  def _example(self, rng: np.random.Generator) -> Example:
    raise NotImplementedError

  @property
  def chance(self) -> float:
    """Expected per-example accuracy of a guesser that ignores the context."""
    raise NotImplementedError

  def __repr__(self) -> str:
    return f"{type(self).__name__}(length={self.length}, seed={self.seed})"


def check_range(name: str, token_range: tuple[int, int], size: int) -> tuple[int, int]:
  """Validates a ``[lo, hi)`` token range inside the vocab holding at least ``size`` ids."""
  lo, hi = (int(t) for t in token_range)
  if not 0 <= lo < hi <= VOCAB_SIZE:
    raise InputError(f"{name}: token_range {token_range} must lie in [0, {VOCAB_SIZE})")
  if hi - lo < size:
    raise InputError(f"{name}: token_range {token_range} has {hi - lo} ids, needs {size}")
  return lo, hi


def check_depth(name: str, depth: float | None) -> float | None:
  """``None`` (uniform random per example) or a fraction of the filler in ``[0, 1]``."""
  if depth is not None and not 0.0 <= float(depth) <= 1.0:
    raise InputError(f"{name}: depth must be in [0, 1] or None, got {depth}")
  return None if depth is None else float(depth)


def check_corpus(name: str, corpus: np.ndarray) -> np.ndarray:
  """Validates a haystack corpus: a non-empty 1-D array of byte token ids."""
  corpus = np.asarray(corpus)
  if corpus.ndim != 1 or corpus.size == 0 or not np.issubdtype(corpus.dtype, np.integer):
    raise InputError(f"{name}: corpus must be a non-empty 1-D integer array, got {corpus.shape}")
  if corpus.min() < 0 or corpus.max() >= VOCAB_SIZE:
    raise InputError(f"{name}: corpus ids must lie in [0, {VOCAB_SIZE})")
  return corpus.astype(np.int32)


_FILLER = encode(
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def haystack(rng: np.random.Generator, size: int, corpus: np.ndarray | None) -> np.ndarray:
  """``size`` filler tokens: a random window of ``corpus`` (wrapping), else repeated sentences."""
  if corpus is None:
    return np.resize(_FILLER, size)
  start = rng.integers(corpus.size)
  return np.take(corpus, np.arange(start, start + size), mode="wrap")


def _boundaries(hay: np.ndarray) -> np.ndarray:
  """Offsets where a sentence or line starts (after a newline or after ``". "``), plus ends."""
  nl, dot, sp = (int(c) for c in encode("\n. "))
  ok = np.zeros(hay.size + 1, bool)
  ok[[0, hay.size]] = True
  ok[1:] |= hay == nl
  ok[2:] |= (hay[:-1] == dot) & (hay[1:] == sp)
  return np.flatnonzero(ok)


def insert(
  hay: np.ndarray, pieces: list[np.ndarray], offsets: list[int], *, snap: int = 64
) -> tuple[np.ndarray, list[int], list[int]]:
  """Inserts ``pieces`` into ``hay`` at (snapped) ``offsets``.

  Each offset moves back to the nearest sentence/line start at most ``snap`` tokens earlier, so
  inserted sentences do not split words where the haystack allows it.

  Args:
    hay: filler tokens ``[F]``.
    pieces: token arrays to insert, in the order they must appear.
    offsets: non-decreasing haystack offsets in ``[0, F]``, one per piece.
    snap: the farthest a piece moves back to a boundary.

  Returns:
    The tokens ``[F + sum(len(pieces))]``, each piece's start index in them and each piece's
    snapped offset in ``hay``.
  """
  bounds = _boundaries(hay)
  snapped = []
  for off in offsets:
    b = bounds[np.searchsorted(bounds, off, side="right") - 1]
    snapped.append(int(b) if off - b <= snap else int(off))
  parts, starts, prev, shift = [], [], 0, 0
  for piece, off in zip(pieces, snapped):
    parts += [hay[prev:off], piece]
    starts.append(off + shift)
    shift += piece.size
    prev = off
  parts.append(hay[prev:])
  return np.concatenate(parts).astype(np.int32), [int(s) for s in starts], snapped


def digits(rng: np.random.Generator, n: int) -> str:
  """``n`` uniform random decimal digits (leading zeros allowed, so each digit is uniform)."""
  return "".join(str(d) for d in rng.integers(0, 10, n))
