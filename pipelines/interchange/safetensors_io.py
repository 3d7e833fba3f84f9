"""Safetensors files and checksums: memzoo's flat parameter names, reading a file with its
corruption named, and the ``checksums.json`` manifest every export directory carries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipelines.errors import CorruptFileError, InputError, MissingFileError
from pipelines.rundir import atomic_write_text

CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = "memzoo-export-sha256"


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """``{"blocks.0.attn.wq": array}`` for every ``nnx.Param`` of ``model`` (host copies)."""
  params = nnx.state(model, nnx.Param)
  return {
    ".".join(str(p) for p in path): np.asarray(jax.device_get(v[...]))
    for path, v in nnx.to_flat_state(params)
  }


def assign_params(model: nnx.Module, weights: dict[str, np.ndarray], source: str) -> None:
  """Writes ``weights`` into ``model``'s parameters in place, checking names, shapes, dtypes.

  Raises:
    CorruptFileError: a missing, unexpected or mis-shaped tensor (named in the message).
  """
  params = nnx.state(model, nnx.Param)
  flat = {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(params)}
  missing = sorted(set(flat) - set(weights))
  extra = sorted(set(weights) - set(flat))
  if missing or extra:
    raise CorruptFileError(f"{source}: missing tensors {missing[:5]}, unexpected {extra[:5]}")
  for name, var in flat.items():
    w = weights[name]
    if tuple(w.shape) != tuple(var[...].shape):
      raise CorruptFileError(
        f"{source}: tensor {name!r} has shape {tuple(w.shape)}, the model expects "
        f"{tuple(var[...].shape)}"
      )
    var[...] = jnp.asarray(w, var[...].dtype)


def sha256(path: str | Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def write_checksums(directory: str | Path) -> Path:
  """Writes ``directory/checksums.json``: the SHA-256 of every other file under it."""
  directory = Path(directory)
  files = {
    f.relative_to(directory).as_posix(): sha256(f)
    for f in sorted(directory.rglob("*"))
    if f.is_file() and f.name != CHECKSUMS and not f.name.endswith(".tmp")
  }
  body = {"format": CHECKSUMS_FORMAT, "version": 1, "files": files}
  atomic_write_text(directory / CHECKSUMS, json.dumps(body, indent=1) + "\n")
  return directory / CHECKSUMS


def verify_checksums(directory: str | Path) -> None:
  """Checks every file listed in ``directory/checksums.json``.

  Raises:
    CorruptFileError: no manifest (an interrupted or foreign export), or a file that is missing
      or whose SHA-256 does not match.
  """
  directory = Path(directory)
  path = directory / CHECKSUMS
  if not path.is_file():
    raise CorruptFileError(
      f"{directory}: no {CHECKSUMS} (the export was interrupted or predates checksums); "
      "export the run again"
    )
  try:
    body = json.loads(path.read_text())
    files = body["files"]
    if body.get("format") != CHECKSUMS_FORMAT or not isinstance(files, dict):
      raise InputError("not a checksum manifest")
  except (OSError, ValueError, KeyError, TypeError):
    raise CorruptFileError(f"{path}: unreadable checksum manifest") from None
  for rel, want in files.items():
    f = directory / rel
    if not f.is_file():
      raise CorruptFileError(f"{f}: listed in {CHECKSUMS} but missing")
    if sha256(f) != want:
      raise CorruptFileError(
        f"{f}: SHA-256 does not match {CHECKSUMS} (the file is corrupt or was replaced)"
      )


def check_finite(weights: dict[str, np.ndarray], source: str) -> None:
  """Raises CorruptFileError naming the tensors of ``weights`` that hold NaN/inf."""
  bad = [
    n for n, w in weights.items() if np.issubdtype(w.dtype, np.inexact) and not np.isfinite(w).all()
  ]
  if bad:
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise CorruptFileError(f"{source}: non-finite values in {', '.join(bad[:3])}{more}")


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays.

  Raises:
    CorruptFileError: the file is truncated or its header is not valid safetensors.
  """
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  path = Path(path)
  if not path.is_file():
    raise MissingFileError(f"no safetensors file at {path}")
  try:
    return load_file(str(path))
  except (SafetensorError, ValueError, OSError) as e:
    raise CorruptFileError(f"{path}: not a readable safetensors file (truncated?): {e}") from None
