"""Packing documents into fixed-length sequences with segment ids.

Documents become ``[BOS] tokens [EOS]`` (no BOS where the tokenizer has none) and are
concatenated into one stream; sequence ``i`` is the window ``[i L, (i + 1) L + 1)`` of that
stream, so every token is predicted exactly once.
``segment_ids`` number the documents inside a window from 1, so attention never crosses a
document boundary, and ``loss_mask`` drops the one target per boundary that belongs to the next
document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines.data.corpus import Document
from pipelines.errors import InputError


def pack(documents: Sequence[Document], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
  """Returns (tokens ``[N]`` uint16, or uint32 for vocabularies over 65536 ids, document index
  ``[N]`` int32) of the concatenated stream; ``tokenizer`` is a
  ``pipelines.data.hf_tokenizer`` one."""
  if not documents:
    raise InputError("no documents to pack")
  bos = tokenizer.bos_id is not None
  pieces = [tokenizer.encode(d.text, bos=bos, eos=True) for d in documents]
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
  tokens = np.concatenate(pieces).astype(dtype)
  doc_ids = np.repeat(np.arange(len(pieces), dtype=np.int32), [len(p) for p in pieces])
  return tokens, doc_ids


def check_vocab(tokens: np.ndarray, vocab_size: int, what: str = "data") -> None:
  """Token ids must index the model's embedding table."""
  if tokens.size and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
    raise InputError(
      f"{what}: token ids span [{int(tokens.min())}, {int(tokens.max())}] but the model's "
      f"vocab_size is {vocab_size}"
    )


class PackedSequences:
  """A grain random-access source of packed training sequences.

  Each item: ``inputs, targets, segment_ids [L]`` int32 and ``loss_mask [L]`` float32.
  With ``single_stream`` (families whose memory has no reset at document starts) every row
  holds one document: rows start at a document start or continue the previous row of the same
  document, and the rest of a row after its document ends is padding (segment 2, no loss).
  """

  def __init__(
    self, tokens: np.ndarray, doc_ids: np.ndarray, seq_len: int, single_stream: bool = False
  ):
    if len(tokens) != len(doc_ids):
      raise InputError("tokens and doc_ids differ in length")
    self.tokens, self.doc_ids, self.seq_len = tokens, doc_ids, seq_len
    self.single_stream = single_stream
    if single_stream:
      # Row starts: every seq_len tokens from each document start, while a target is left.
      bounds = np.flatnonzero(np.diff(doc_ids, prepend=-1, append=-1))
      starts = [np.arange(lo, hi - 1, seq_len) for lo, hi in zip(bounds[:-1], bounds[1:])]
      self._starts = np.concatenate(starts).astype(np.int64)
      self._len = len(self._starts)
    else:
      self._len = (len(tokens) - 1) // seq_len
    if self._len < 1:
      raise InputError(f"only {len(tokens)} tokens: too few for one sequence of {seq_len}")

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self._len:
      raise IndexError(index)
    if self.single_stream:
      return self._single(index)
    lo = index * self.seq_len
    window = self.tokens[lo : lo + self.seq_len + 1].astype(np.int32)
    docs = self.doc_ids[lo : lo + self.seq_len + 1]
    seg = (docs - docs[0] + 1).astype(np.int32)
    return {
      "inputs": window[:-1],
      "targets": window[1:],
      "segment_ids": seg[:-1],
      "loss_mask": (seg[:-1] == seg[1:]).astype(np.float32),
    }

  def _single(self, index: int) -> dict[str, np.ndarray]:
    lo, n = int(self._starts[index]), self.seq_len
    window = self.tokens[lo : lo + n + 1].astype(np.int32)
    same = self.doc_ids[lo : lo + n + 1] == self.doc_ids[lo]
    window = np.where(same, window, 0)
    window = np.pad(window, (0, n + 1 - len(window)))
    same = np.pad(same, (0, n + 1 - len(same)))
    return {
      "inputs": window[:-1],
      "targets": window[1:],
      "segment_ids": np.where(same[:-1], 1, 2).astype(np.int32),
      "loss_mask": (same[:-1] & same[1:]).astype(np.float32),
    }

  def __repr__(self) -> str:
    return f"PackedSequences(n={self._len}, seq_len={self.seq_len})"


def unigram_bits_per_byte(
  train_tokens: np.ndarray, heldout: PackedSequences, n: int, token_bytes: np.ndarray | None = None
) -> float:
  """Bits per byte of a unigram model fitted on the training stream (add-one smoothing),
  measured on the first ``n`` held-out sequences: the baseline a model must beat.

  ``token_bytes [V]``: UTF-8 bytes per id (the tokenizer's ``token_bytes()``); default: the byte
  tokenizer's (ids below 256 are one byte).
  """
  counts = np.bincount(train_tokens, minlength=int(train_tokens.max()) + 1).astype(np.float64) + 1
  logp = np.log2(counts / counts.sum())
  bits, nbytes = 0.0, 0.0
  for i in range(min(n, len(heldout))):
    ex = heldout[i]
    m = ex["loss_mask"] > 0
    t = ex["targets"][m]
    t = t[t < len(logp)]
    bits -= float(logp[t].sum())
    nbytes += float((t < 256).sum() if token_bytes is None else token_bytes[t].sum())
  return bits / max(nbytes, 1.0)
