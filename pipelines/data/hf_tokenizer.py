"""Which tokenizer a run uses, and imported models' tokenizers behind ``ByteTokenizer``'s interface.

A run records its tokenizer in ``data.tokenizer`` of its ``config.yaml``: ``byte`` (the built-in
byte-level tokenizer, the default for runs trained here) or a path to a ``tokenizer.json``
(Hugging Face ``tokenizers``), a SentencePiece ``tokenizer.model`` or a directory holding one;
a relative path is read from the run directory. ``memzoo import-hf`` copies the model's
tokenizer files into the run and sets ``data.tokenizer: tokenizer.json``.

``load_tokenizer(run_dir_or_config)`` is the one place that turns this into a tokenizer; data
loading, evaluation, the synthetic tasks, extrapolation, generation and export all go through
it. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.tokenizer import ByteTokenizer
from pipelines.errors import InputError, MissingFileError

BYTE = "byte"
# Files that make up a model's tokenizer (copied on import, and into an HF export).
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


class HFTokenizer:
  """A ``tokenizers.Tokenizer`` with ``encode(text, bos=, eos=) -> int32 [n]`` and ``decode``."""

  def __init__(self, path: str | Path, special: dict[str, str] | None = None):
    from tokenizers import Tokenizer

    self.path = Path(path)
    self.name = str(self.path)
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

  def encode_prompt(self, text: str) -> np.ndarray:
    """Ids of a prompt as ``transformers`` makes them: the tokenizer's own post-processor adds
    its specials (e.g. Llama's BOS), int32 ``[n]``."""
    return np.asarray(self._tok.encode(text, add_special_tokens=True).ids, np.int32)

  def encode_marked(self, parts: Sequence[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Encodes ``(text, mark)`` pieces as ONE text; returns (ids ``[n]``, mark per id ``[n]``).

    Subword merges may cross piece boundaries, so the ids are the tokenizer's own segmentation
    of the joined text (what the model saw in training), not the pieces' ids concatenated. A
    token gets the mark of the first non-zero-marked piece its characters overlap (0 if none),
    so an answer's tokens include one that also holds, e.g., the space before it.
    """
    text = "".join(t for t, _ in parts)
    enc = self._tok.encode(text, add_special_tokens=False)
    char_mark = np.zeros(len(text) + 1, np.int32)
    pos = 0
    for t, m in parts:
      char_mark[pos : pos + len(t)] = m
      pos += len(t)
    marks = np.zeros(len(enc.ids), np.int32)
    for i, (lo, hi) in enumerate(enc.offsets):
      inside = char_mark[lo : max(hi, lo + 1)]
      nz = inside[inside > 0]
      marks[i] = nz[0] if nz.size else 0
    return np.asarray(enc.ids, np.int32), marks

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def bytes_per_token(self, ids: np.ndarray) -> float:
    """Average UTF-8 bytes per token of ``ids`` (for bits-per-byte)."""
    ids = np.asarray(ids).reshape(-1)
    return len(self.decode(ids).encode("utf-8")) / max(len(ids), 1)

  def special_ids(self) -> set[int]:
    return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

  @functools.cached_property
  def _token_bytes(self) -> np.ndarray:
    spec = json.loads(self._tok.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
    out = np.zeros(self.vocab_size, np.float32)
    special = self.special_ids()
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i)
      if piece is None or i in special:
        continue
      if byte_level:  # one character of the byte-level alphabet per byte
        out[i] = len(piece)
      elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # SentencePiece byte fallback
        out[i] = 1
      else:
        out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for ``[vocab_size]`` float32 (0 for specials); with it,
    bits per byte of a subword model is comparable with a byte model's."""
    return self._token_bytes

  def drawable_ids(self) -> np.ndarray:
    """Non-special ids in increasing order: the symbols a synthetic task (MQAR, selective
    copy, set disjointness) draws from; its ``token_range`` indexes this array."""
    special = self.special_ids()
    return np.asarray([i for i in range(self.vocab_size) if i not in special], np.int32)

  def token_texts(self, ids: np.ndarray) -> list[str]:
    """The text of each id of ``ids`` decoded alone (specials give ``""``)."""
    return [self._text(int(i)) for i in ids]

  @functools.cache  # noqa: B019 - one tokenizer per run, kept for its life
  def _text(self, i: int) -> str:
    return self._tok.decode([i], skip_special_tokens=True)


class SentencePieceTokenizer(HFTokenizer):
  """A SentencePiece ``.model`` file behind the same interface."""

  def __init__(self, path: str | Path):
    import sentencepiece as spm

    self.path = Path(path)
    self.name = str(self.path)
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

  def encode_marked(self, parts: Sequence[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    ids = [self.encode(t) for t, _ in parts]
    marks = [np.full(len(i), m, np.int32) for i, (_, m) in zip(ids, parts)]
    return np.concatenate(ids), np.concatenate(marks)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def encode_prompt(self, text: str) -> np.ndarray:
    return self.encode(text, bos=self.bos_id is not None)

  def special_ids(self) -> set[int]:
    return {i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)}

  @functools.cached_property
  def _token_bytes(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.float32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      out[i] = 1 if self._sp.is_byte(i) else len(self._sp.id_to_piece(i).replace("\u2581", " "))
    return out

  def _text(self, i: int) -> str:
    return self._sp.decode([i])


Tokenizer = ByteTokenizer | HFTokenizer


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
  if not path.is_file():
    raise MissingFileError(f"tokenizer file not found: {path}")
  if path.suffix == ".model":
    return SentencePieceTokenizer(path)
  return HFTokenizer(path, special)


def load_tokenizer(run_dir_or_config: Any) -> Tokenizer:
  """The tokenizer of a run: its directory (holding ``config.yaml``), or its ``Experiment``.

  ``data.tokenizer: byte`` gives the byte tokenizer; a path gives that tokenizer, read from the
  run directory when relative (the run directory given, else the config's ``run_dir``).

  Raises:
    FileNotFoundError: the recorded tokenizer file is missing.
  """
  from pipelines import config as config_lib

  if isinstance(run_dir_or_config, config_lib.Experiment):
    exp, base = run_dir_or_config, Path(run_dir_or_config.run_dir)
  else:
    base = Path(run_dir_or_config)
    exp = config_lib.load(base / "config.yaml")
  spec = exp.data.tokenizer
  if spec == BYTE:
    return ByteTokenizer()
  path = Path(spec)
  return load(path if path.is_absolute() else base / path)


def copy_files(src: str | Path, dst: str | Path) -> str | None:
  """Copies the tokenizer files of directory ``src`` into ``dst``; returns the ``data.tokenizer``
  value naming them relative to ``dst`` (``None`` when ``src`` has no tokenizer)."""
  src, dst = Path(src), Path(dst)
  copied = [n for n in FILES if (src / n).is_file()]
  for name in copied:
    shutil.copy(src / name, dst / name)
  for name in ("tokenizer.json", "tokenizer.model"):
    if name in copied:
      return name
  return None


def export_files(run_dir: str | Path, exp: Any, out: str | Path) -> list[str]:
  """Copies the tokenizer files a run uses into an export directory ``out`` (none for
  ``byte``: it has no Hugging Face file); returns the names copied."""
  spec = exp.data.tokenizer
  if spec == BYTE:
    return []
  path = Path(spec)
  path = path if path.is_absolute() else Path(run_dir) / path
  directory = path if path.is_dir() else path.parent
  names = [n for n in FILES if (directory / n).is_file()]
  for n in names:
    shutil.copy(directory / n, Path(out) / n)
  return names
