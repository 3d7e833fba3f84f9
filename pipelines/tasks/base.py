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

Every task takes ``tokenizer=`` (default the byte tokenizer; an imported model's from
``pipelines.data.hf_tokenizer.load_tokenizer``): texts are built with it, a question and its answers
are encoded as one text (so the answer is tokenized as the model would see it in running text),
and symbol tasks draw their ids from its non-special vocabulary (``token_range`` indexes
``tokenizer.drawable_ids()``, which is the identity for bytes). Lengths are in tokens.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines.data.tokenizer import ByteTokenizer
from pipelines.errors import InputError

Example = dict[str, Any]


BYTES = ByteTokenizer()
_TOKENIZER = BYTES
encode = _TOKENIZER.encode  # text -> int32 byte ids
decode = _TOKENIZER.decode  # ids -> text, special tokens dropped


def start_id(tok: Any) -> int:
  """The id every example starts with: BOS, or EOS for tokenizers without BOS (GPT-2 style)."""
  sid = tok.bos_id if tok.bos_id is not None else tok.eos_id
  if sid is None:
    raise InputError(f"tokenizer {getattr(tok, 'name', tok)} has neither a bos nor an eos token")
  return int(sid)


class Builder:
  """Accumulates the ``full`` token stream of one example with answer-span labels."""

  def __init__(self, tokenizer: Any = BYTES):
    self.tok = tokenizer
    self._ids: list[np.ndarray] = [np.array([start_id(tokenizer)], np.int32)]
    self._spans: list[np.ndarray] = [np.zeros(1, np.int32)]
    self.pos = 1
    self.num_spans = 0

  def add(self, ids: np.ndarray | str, *, answer: bool = False) -> int:
    """Appends tokens (a string is encoded); returns the ``full`` index they start at.

    With ``answer=True`` the tokens form the next answer span.
    """
    ids = self.tok.encode(ids) if isinstance(ids, str) else np.asarray(ids, np.int32).ravel()
    start = self.pos
    if answer:
      self.num_spans += 1
    self._ids.append(ids)
    self._spans.append(np.full(ids.shape, self.num_spans if answer else 0, np.int32))
    self.pos += ids.size
    return start

  def add_encoded(self, ids: np.ndarray, marks: np.ndarray) -> int:
    """Appends ``encode_qa`` output: ids with mark ``k >= 1`` become answer span
    ``num_spans + k``; returns the ``full`` index they start at."""
    start = self.pos
    spans = np.where(marks > 0, marks + self.num_spans, 0).astype(np.int32)
    self.num_spans += int(marks.max(initial=0))
    self._ids.append(np.asarray(ids, np.int32))
    self._spans.append(spans)
    self.pos += len(ids)
    return start

  def finish(self, length: int, **meta: Any) -> Example:
    """Pads (PAD, segment 0) to ``length + 1`` tokens and splits into inputs and targets."""
    full = np.concatenate(self._ids)
    spans = np.concatenate(self._spans)
    if full.size > length + 1:
      raise InputError(f"example needs {full.size - 1} tokens but length={length}")
    pad = length + 1 - full.size
    segment = np.concatenate([np.ones(full.size, np.int32), np.zeros(pad, np.int32)])
    pad_id = self.tok.pad_id if self.tok.pad_id is not None else self.tok.eos_id
    full = np.concatenate([full, np.full(pad, pad_id, np.int32)])
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


def encode_qa(tok: Any, parts: Sequence[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
  """Encodes ``(text, is_answer)`` pieces as one text; returns (ids, marks) where the tokens of
  the ``k``-th answer piece have mark ``k`` (for ``Builder.add_encoded``)."""
  k, marked = 0, []
  for text, is_answer in parts:
    k += bool(is_answer)
    marked.append((text, k if is_answer else 0))
  return tok.encode_marked(marked)


class TaskSource:
  """Base of all tasks: ``len`` examples, example ``i`` drawn from ``default_rng((seed, i))``.

  Subclasses set ``name`` and implement ``_example(rng) -> Example`` and ``chance``.

  Args:
    length: ``T``, the number of input (and target) tokens of every example.
    seed: the source seed; with the index it fixes the example.
    num_examples: the reported ``len`` (examples are procedural, any count works).
    tokenizer: the tokenizer texts are built with (default bytes); see the module docstring.
  """

  name = "task"

  def __init__(
    self, *, length: int, seed: int = 0, num_examples: int = 10_000, tokenizer: Any = None
  ):
    self.tok = BYTES if tokenizer is None else tokenizer
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


def check_range(
  name: str, token_range: tuple[int, int], size: int, tok: Any = BYTES
) -> tuple[int, int]:
  """Validates a ``[lo, hi)`` range of ``tok.drawable_ids()`` holding at least ``size`` ids."""
  lo, hi = (int(t) for t in token_range)
  n = len(tok.drawable_ids())
  if not 0 <= lo < hi <= n:
    raise InputError(f"{name}: token_range {token_range} must lie in [0, {n})")
  if hi - lo < size:
    raise InputError(f"{name}: token_range {token_range} has {hi - lo} ids, needs {size}")
  return lo, hi


def check_depth(name: str, depth: float | None) -> float | None:
  """``None`` (uniform random per example) or a fraction of the filler in ``[0, 1]``."""
  if depth is not None and not 0.0 <= float(depth) <= 1.0:
    raise InputError(f"{name}: depth must be in [0, 1] or None, got {depth}")
  return None if depth is None else float(depth)


def check_corpus(name: str, corpus: np.ndarray, tok: Any = BYTES) -> np.ndarray:
  """Validates a haystack corpus: a non-empty 1-D array of ``tok``'s token ids."""
  corpus = np.asarray(corpus)
  if corpus.ndim != 1 or corpus.size == 0 or not np.issubdtype(corpus.dtype, np.integer):
    raise InputError(f"{name}: corpus must be a non-empty 1-D integer array, got {corpus.shape}")
  if corpus.min() < 0 or corpus.max() >= tok.vocab_size:
    raise InputError(f"{name}: corpus ids must lie in [0, {tok.vocab_size})")
  return corpus.astype(np.int32)


def check_symbol(name: str, what: str, token: int, ids: np.ndarray) -> int:
  """A separator/filler id must be a real id and not one of the drawn symbols ``ids``."""
  if token is None or np.any(ids == int(token)):
    raise InputError(f"{name}: {what} {token} must lie outside token_range")
  return int(token)


_FILLER_TEXT = (
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


@functools.cache
def _filler(tok: Any) -> np.ndarray:
  return tok.encode(_FILLER_TEXT)


def haystack(
  rng: np.random.Generator, size: int, corpus: np.ndarray | None, tok: Any = BYTES
) -> np.ndarray:
  """``size`` filler tokens: a random window of ``corpus`` (wrapping), else repeated sentences."""
  if corpus is None:
    return np.resize(_filler(tok), size)
  start = rng.integers(corpus.size)
  return np.take(corpus, np.arange(start, start + size), mode="wrap")


def _boundaries(hay: np.ndarray, tok: Any = BYTES) -> np.ndarray:
  """Offsets where a sentence or line starts (after a token ending in a newline or ``". "``, or
  after ``"."`` then a token ``" "``), plus the ends."""
  uniq, inv = np.unique(hay, return_inverse=True)
  texts = tok.token_texts(uniq)
  nl = np.array([t.endswith("\n") or t.endswith(". ") for t in texts], bool)[inv]
  dot = np.array([t.endswith(".") for t in texts], bool)[inv]
  sp = np.array([t == " " for t in texts], bool)[inv]
  ok = np.zeros(hay.size + 1, bool)
  ok[[0, hay.size]] = True
  ok[1:] |= nl
  ok[2:] |= dot[:-1] & sp[1:]
  return np.flatnonzero(ok)


def insert(
  hay: np.ndarray,
  pieces: list[np.ndarray],
  offsets: list[int],
  *,
  snap: int = 64,
  tok: Any = BYTES,
) -> tuple[np.ndarray, list[int], list[int]]:
  """Inserts ``pieces`` into ``hay`` at (snapped) ``offsets``.

  Each offset moves back to the nearest sentence/line start at most ``snap`` tokens earlier, so
  inserted sentences do not split words where the haystack allows it.

  Args:
    hay: filler tokens ``[F]``.
    pieces: token arrays to insert, in the order they must appear.
    offsets: non-decreasing haystack offsets in ``[0, F]``, one per piece.
    snap: the farthest a piece moves back to a boundary.
    tok: the tokenizer of ``hay`` (to find sentence starts).

  Returns:
    The tokens ``[F + sum(len(pieces))]``, each piece's start index in them and each piece's
    snapped offset in ``hay``.
  """
  bounds = _boundaries(hay, tok)
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
