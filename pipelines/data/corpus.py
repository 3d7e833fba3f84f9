"""Document sources: the Python standard library (the embedded default), text and JSONL files.

A corpus is a list of ``Document(name, text)`` in a deterministic order plus a manifest
(source, file count, bytes, sha256 over names and contents) that a run records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from pipelines.errors import InputError, MissingFileError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".yaml", ".yml", ".toml", ".c", ".h")


@dataclasses.dataclass(frozen=True)
class Document:
  name: str
  text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
  documents: tuple[Document, ...]
  manifest: dict

  def split(self, heldout_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, heldout) by a hash of each document's name: stable as the corpus grows."""
    train, heldout = [], []
    for doc in self.documents:
      h = int.from_bytes(hashlib.sha1(doc.name.encode()).digest()[:8], "big") / 2**64
      (heldout if h < heldout_fraction else train).append(doc)
    if not train or not heldout:
      # Tiny corpora: keep the split non-empty on both sides.
      docs = list(self.documents)
      if len(docs) < 2:
        raise InputError("a corpus needs at least 2 documents for a train/held-out split")
      n = max(1, round(len(docs) * heldout_fraction))
      return docs[n:], docs[:n]
    return train, heldout


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(max_documents: int = 0) -> Corpus:
  """Every ``.py`` file of the running interpreter's standard library (no site-packages)."""
  root = stdlib_root()
  files = sorted(
    p
    for p in root.rglob("*.py")
    if "site-packages" not in p.parts and "dist-packages" not in p.parts
  )
  return _from_files(files, root, "stdlib", max_documents)


def text_corpus(paths: Sequence[str], max_documents: int = 0) -> Corpus:
  """Local text files, or every text file under the given folders."""
  files: list[Path] = []
  for p in map(Path, paths):
    if p.is_dir():
      files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES))
    elif p.is_file():
      files.append(p)
    else:
      raise MissingFileError(f"data.paths: {p} does not exist")
  if not files:
    raise InputError(f"data.paths {list(paths)} hold no text files ({', '.join(TEXT_SUFFIXES)})")
  return _from_files(files, None, "text", max_documents)


def jsonl_corpus(paths: Sequence[str], field: str = "text", max_documents: int = 0) -> Corpus:
  """One document per JSON line, its text in ``field``."""
  docs = []
  h = hashlib.sha256()
  for path in map(Path, paths):
    if not path.is_file():
      raise MissingFileError(f"data.paths: {path} does not exist")
    with path.open(encoding="utf-8") as f:
      lines = _utf8_lines(path, f)
      for lineno, line in enumerate(lines, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise InputError(f"{path}:{lineno}: not valid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
          raise InputError(f"{path}:{lineno}: no string field {field!r}")
        name = f"{path}:{lineno}"
        docs.append(Document(name, record[field]))
        h.update(name.encode() + b"\0" + record[field].encode() + b"\0")
        if max_documents and len(docs) >= max_documents:
          break
  if not docs:
    raise InputError(f"no documents in {list(paths)}")
  manifest = {"source": "jsonl", "files": len(paths), "documents": len(docs)}
  manifest.update(bytes=sum(len(d.text.encode()) for d in docs), sha256=h.hexdigest())
  return Corpus(tuple(docs), manifest)


def _from_files(files: list[Path], root: Path | None, source: str, max_documents: int) -> Corpus:
  if max_documents:
    files = files[:max_documents]
  docs = []
  bad: list[tuple[Path, int]] = []
  h = hashlib.sha256()
  for f in files:
    data = f.read_bytes()
    name = str(f.relative_to(root)) if root else str(f)
    h.update(name.encode() + b"\0" + data + b"\0")
    text, invalid = _decode(f, data)
    if invalid:
      bad.append((f, invalid))
    docs.append(Document(name, text))
  if bad:
    # One line for the corpus; a mostly-invalid file was already refused by _decode.
    log.warning(
      "%d corpus file(s) hold invalid UTF-8 bytes, read as U+FFFD (%s%s)",
      len(bad),
      ", ".join(f"{p}: {n}" for p, n in bad[:2]),
      ", ..." if len(bad) > 2 else "",
    )
  manifest = {
    "source": source,
    "root": str(root) if root else None,
    "files": len(files),
    "documents": len(docs),
    "bytes": sum(len(d.text.encode()) for d in docs),
    "sha256": h.hexdigest(),
  }
  return Corpus(tuple(docs), manifest)


_CONTROL = bytes([*range(0, 9), *range(14, 32), 127])


def _decode(path: Path, data: bytes) -> tuple[str, int]:
  """(UTF-8 text, invalid byte count) of a corpus file; refused if it is mostly not text.

  Raises:
    ValueError: binary data (NUL bytes, as in images or UTF-16) or mostly invalid UTF-8.
  """
  text = data.decode("utf-8", errors="replace")
  if not data:
    return text, 0
  invalid = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))
  # Control bytes other than whitespace (NUL in UTF-16 or images, ...) count as not text.
  control = len(data) - len(data.translate(None, _CONTROL))
  if (invalid + control) * 2 > len(data):
    raise InputError(
      f"data.paths: {path} is not UTF-8 text ({invalid + control:,} of its {len(data):,} bytes "
      "are invalid UTF-8 or control bytes); remove it or convert it to UTF-8"
    )
  return text, invalid


def _utf8_lines(path: Path, f):
  """The lines of a text file opened as UTF-8, streamed; invalid UTF-8 is one clear error."""
  try:
    yield from f
  except UnicodeDecodeError as e:
    raise InputError(
      f"data.paths: {path} is not UTF-8 text (invalid byte at offset {e.start})"
    ) from None
