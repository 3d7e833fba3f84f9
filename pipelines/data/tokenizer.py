"""The built-in byte-level tokenizer: ids 0..255 are bytes, then a few special tokens."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BOS = 256
EOS = 257
PAD = 258
SEP = 259
NUM_SPECIAL = 4
VOCAB_SIZE = 256 + NUM_SPECIAL


class ByteTokenizer:
  """UTF-8 bytes as tokens. Decoding drops special tokens and replaces invalid UTF-8."""

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

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")

  def bytes_per_token(self, ids: np.ndarray) -> float:
    """Average UTF-8 bytes per token (1.0 for a byte tokenizer, ignoring specials)."""
    return 1.0
