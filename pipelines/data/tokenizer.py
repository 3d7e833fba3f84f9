"""The built-in byte-level tokenizer: ids 0..255 are bytes, then a few special tokens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

BOS = 256
EOS = 257
PAD = 258
SEP = 259
NUM_SPECIAL = 4
VOCAB_SIZE = 256 + NUM_SPECIAL


class ByteTokenizer:
  """UTF-8 bytes as tokens. Decoding drops special tokens and replaces invalid UTF-8.

  ``pipelines.data.hf_tokenizer.HFTokenizer`` has the same interface for imported models; code that
  handles text takes either (``pipelines.data.hf_tokenizer.load_tokenizer`` picks the run's).
  """

  name = "byte"
  vocab_size = VOCAB_SIZE
  bos_id = BOS
  eos_id = EOS
  pad_id = PAD
  sep_id = SEP

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """Returns int32 ids ``[n]``."""
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    parts = ([np.array([BOS], np.int32)] if bos else []) + [ids]
    if eos:
      parts.append(np.array([EOS], np.int32))
    return np.concatenate(parts)

  def encode_prompt(self, text: str) -> np.ndarray:
    """A prompt's ids: BOS then the bytes (how runs trained here see a document start)."""
    return self.encode(text, bos=True)

  def encode_marked(self, parts: Sequence[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Encodes ``(text, mark)`` pieces as one text; returns (ids ``[n]``, mark per id ``[n]``).

    Bytes never merge across pieces, so this is the pieces encoded one by one.
    """
    ids = [self.encode(t) for t, _ in parts]
    marks = [np.full(len(i), m, np.int32) for i, (_, m) in zip(ids, parts)]
    return np.concatenate(ids), np.concatenate(marks)

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")

  def bytes_per_token(self, ids: np.ndarray) -> float:
    """Average UTF-8 bytes per token (1.0 for a byte tokenizer, ignoring specials)."""
    return 1.0

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for ``[vocab_size]`` float32 (0 for specials)."""
    return (np.arange(VOCAB_SIZE) < 256).astype(np.float32)

  def drawable_ids(self) -> np.ndarray:
    """Ids a synthetic task may draw as symbols; ``token_range`` indexes this array. For bytes
    it is every id (identity), so byte-level ranges keep their meaning."""
    return np.arange(VOCAB_SIZE, dtype=np.int32)

  def token_texts(self, ids: np.ndarray) -> list[str]:
    """The text of each id of ``ids`` alone (specials give ``""``)."""
    return [bytes([int(i)]).decode("latin-1") if 0 <= int(i) < 256 else "" for i in ids]
