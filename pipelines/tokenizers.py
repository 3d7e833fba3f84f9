"""Tokenizers of imported models behind ``ByteTokenizer``'s interface.

``load(path)`` reads a local ``tokenizer.json`` (Hugging Face ``tokenizers``) or a
SentencePiece ``tokenizer.model`` (if ``sentencepiece`` is installed); a run directory made by
``memzoo import-hf`` holds one of them. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipelines.errors import InputError, MissingFileError


class HFTokenizer:
  """A ``tokenizers.Tokenizer`` with ``encode(text, bos=, eos=) -> int32 [n]`` and ``decode``."""

  def __init__(self, path: str | Path, special: dict[str, str] | None = None):
    from tokenizers import Tokenizer

    self.path = Path(path)
    try:
      self._tok = Tokenizer.from_file(str(self.path))
    except Exception as e:  # noqa: BLE001 - the Rust error types are not importable
      raise InputError(f"{self.path}: not a readable tokenizer.json: {e}") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    special = special or {}
    self.bos_id = self._id(special.get("bos_token"), ("<s>", "<|begin_of_text|>", "<|endoftext|>"))
    self.eos_id = self._id(special.get("eos_token"), ("</s>", "<|end_of_text|>", "<|endoftext|>"))
    self.pad_id = self._id(special.get("pad_token"), ("<pad>",))
    if self.pad_id is None:
      self.pad_id = self.eos_id
    self.sep_id = self.eos_id

  def _id(self, name: str | None, fallbacks: tuple[str, ...]) -> int | None:
    for n in (name, *fallbacks):
      if n is not None and self._tok.token_to_id(n) is not None:
        return self._tok.token_to_id(n)
    return None

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """Returns int32 ids ``[n]``; specials only where asked for."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    for flag, tid, name in ((bos, self.bos_id, "bos"), (eos, self.eos_id, "eos")):
      if flag and tid is None:
        raise InputError(f"{self.path} defines no {name} token")
    ids = ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])
    return np.asarray(ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def bytes_per_token(self, ids: np.ndarray) -> float:
    """Average UTF-8 bytes per token of ``ids`` (for bits-per-byte)."""
    ids = np.asarray(ids).reshape(-1)
    return len(self.decode(ids).encode("utf-8")) / max(len(ids), 1)


class SentencePieceTokenizer(HFTokenizer):
  """A SentencePiece ``.model`` file behind the same interface."""

  def __init__(self, path: str | Path):
    import sentencepiece as spm

    self.path = Path(path)
    self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    self.sep_id = self.eos_id

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    ids = self._sp.encode(text)
    ids = ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])
    return np.asarray(ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


def load(path: str | Path) -> HFTokenizer:
  """The tokenizer in ``path`` (a file, or a directory holding ``tokenizer.json`` or
  ``tokenizer.model``); special-token names come from ``tokenizer_config.json`` if present."""
  path = Path(path)
  directory = path if path.is_dir() else path.parent
  special = {}
  if (directory / "tokenizer_config.json").is_file():
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "pad_token"):
      value = cfg.get(key)
      special[key] = value.get("content") if isinstance(value, dict) else value
  if path.is_dir():
    if (path / "tokenizer.json").is_file():
      return HFTokenizer(path / "tokenizer.json", special)
    if (path / "tokenizer.model").is_file():
      return SentencePieceTokenizer(path / "tokenizer.model")
    raise MissingFileError(f"{path} has neither tokenizer.json nor tokenizer.model")
  if path.suffix == ".model":
    return SentencePieceTokenizer(path)
  return HFTokenizer(path, special)
