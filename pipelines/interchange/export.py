"""Exporting a run: safetensors (reloadable without Orbax), Hugging Face, StableHLO.

``memzoo export RUN --format safetensors`` writes ``model.safetensors`` with memzoo's own
parameter names (``blocks.0.attn.wq``) and a ``config.json`` holding the experiment and the
file's SHA-256, so a flipped bit is refused on reload. Every export directory also gets a
``checksums.json`` (the SHA-256 of each file written, itself written last), verified on load;
parameters are checked finite before anything is written. ``--format hf`` is in
``pipelines.interchange.hf``; the safetensors and checksum helpers are in
``pipelines.interchange.safetensors_io``.
``--format stablehlo`` serialises ``jax.export`` artifacts of the forward pass and of one decode
step; both take the weights as a ``{name: array}`` argument (read them from the safetensors file
written beside them), so serving needs neither the zoo's Python code nor Flax.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipelines import config as config_lib
from pipelines.errors import CorruptFileError, InputError
from pipelines.interchange.safetensors_io import (
  CHECKSUMS,
  assign_params,
  check_finite,
  flat_params,
  read_safetensors,
  sha256,
  verify_checksums,
  write_checksums,
)
from pipelines.rundir import atomic_write_bytes, atomic_write_text

FORMAT = "memzoo-safetensors"
FORMATS = ("safetensors", "hf", "stablehlo")


def save_safetensors(model: nnx.Module, exp: config_lib.Experiment, out: str | Path, step: int):
  """Writes ``out/model.safetensors``, ``out/config.json`` and ``out/checksums.json``; returns
  ``out``.

  Raises:
    CorruptFileError: the parameters hold NaN/inf (nothing is written).
  """
  from safetensors.numpy import save

  out = Path(out)
  weights = flat_params(model)
  check_finite(weights, "refusing to export: the model")
  out.mkdir(parents=True, exist_ok=True)
  # A stale manifest would vouch for a half-written export: it goes first and comes back last.
  (out / CHECKSUMS).unlink(missing_ok=True)
  atomic_write_bytes(out / "model.safetensors", save(weights, metadata={"format": FORMAT}))
  meta = {
    "format": FORMAT,
    "version": 1,
    "step": step,
    "sha256": sha256(out / "model.safetensors"),
    "experiment": exp.to_dict(),
  }
  atomic_write_text(out / "config.json", json.dumps(meta, indent=2))
  write_checksums(out)
  return out


def load_safetensors(directory: str | Path) -> tuple[config_lib.Experiment, nnx.Module, int]:
  """(experiment, model, step) from a ``save_safetensors`` directory; no Orbax involved.

  Raises:
    CorruptFileError: checksum mismatch, truncated file, or tensors that do not fit the config.
  """
  from pipelines.run import build_model

  directory = Path(directory)
  verify_checksums(directory)
  meta = json.loads((directory / "config.json").read_text())
  if meta.get("format") != FORMAT:
    raise CorruptFileError(f"{directory}/config.json is not a {FORMAT} export")
  path = directory / "model.safetensors"
  if path.is_file() and sha256(path) != meta["sha256"]:
    raise CorruptFileError(
      f"{path}: SHA-256 does not match config.json (the file is corrupt or was replaced)"
    )
  weights = read_safetensors(path)
  check_finite(weights, str(path))
  exp = config_lib.from_dict(meta["experiment"], source=str(directory / "config.json"))
  graphdef, params, rest = build_model(exp)
  model = nnx.merge(graphdef, params, rest)
  assign_params(model, weights, str(path))
  return exp, model, int(meta["step"])


def _functional(model: nnx.Module):
  """(graphdef, rest, names) so a function of a ``{name: array}`` dict rebuilds ``model``."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  paths = [path for path, _ in nnx.to_flat_state(params)]
  names = [".".join(str(p) for p in path) for path in paths]

  def rebuild(weights: dict[str, jax.Array]) -> nnx.Module:
    flat = nnx.to_flat_state(params)
    new = nnx.from_flat_state(
      [(path, var.replace(weights[name])) for (path, var), name in zip(flat, names)]
    )
    return nnx.merge(graphdef, new, rest)

  return rebuild, names


def export_stablehlo(
  model: nnx.Module,
  out: str | Path,
  *,
  batch: int = 1,
  seq_len: int = 64,
  max_len: int | None = None,
  platforms: tuple[str, ...] = ("cpu",),
) -> dict[str, Path]:
  """Serialises ``forward(weights, tokens [batch, seq_len]) -> logits`` and
  ``decode_step(weights, tokens [batch, 1], state) -> (logits, state)``.

  Returns the paths written: ``forward.stablehlo``, ``decode_step.stablehlo`` and
  ``decode_state.npz`` (the empty decode state, the step's initial input).
  """
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  rebuild, names = _functional(model)
  weights = {n: jax.ShapeDtypeStruct(w.shape, w.dtype) for n, w in flat_params(model).items()}

  def forward(w, tokens):
    return rebuild(w)(tokens)[0]

  def decode_step(w, tokens, state):
    return rebuild(w).step(tokens, state)

  tok = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  fwd = jax.export.export(jax.jit(forward), platforms=platforms)(weights, tok)
  state = model.init_state(batch, max_len)
  state_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  one = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  dec = jax.export.export(jax.jit(decode_step), platforms=platforms)(weights, one, state_spec)
  paths = {"forward": out / "forward.stablehlo", "decode_step": out / "decode_step.stablehlo"}
  (out / CHECKSUMS).unlink(missing_ok=True)
  atomic_write_bytes(paths["forward"], fwd.serialize())
  atomic_write_bytes(paths["decode_step"], dec.serialize())
  leaves = jax.tree.leaves(state)
  paths["decode_state"] = out / "decode_state.npz"
  buf = io.BytesIO()
  np.savez(buf, *[np.asarray(x) for x in leaves])
  atomic_write_bytes(paths["decode_state"], buf.getvalue())
  write_checksums(out)
  return paths


def load_stablehlo(path: str | Path) -> jax.export.Exported:
  """Deserialises an artifact (after checking the ``checksums.json`` beside it); call it with
  ``exported.call(weights, *args)``.

  Raises:
    CorruptFileError: the artifact or a file beside it fails its checksum.
  """
  verify_checksums(Path(path).parent)
  return jax.export.deserialize(bytearray(Path(path).read_bytes()))


def export(run: str | Path, fmt: str, out: str | Path | None = None, **kwargs: Any) -> Path:
  """``memzoo export``: writes ``fmt`` of the run's latest checkpoint to ``out`` (default
  ``RUN/export/<fmt>``); returns the directory."""
  from pipelines.run import load_run

  if fmt not in FORMATS:
    raise InputError(f"unknown export format {fmt!r}; use one of {FORMATS}")
  exp, model, step = load_run(run)  # verifies the checkpoint's checksums and finiteness
  check_finite(flat_params(model), f"refusing to export {run}: the parameters")
  out = Path(out) if out is not None else Path(run) / "export" / fmt
  if fmt == "safetensors":
    return save_safetensors(model, exp, out, step)
  if fmt == "hf":
    from pipelines.data import hf_tokenizer as tokenizers
    from pipelines.interchange import hf

    out.mkdir(parents=True, exist_ok=True)
    (out / CHECKSUMS).unlink(missing_ok=True)
    out = hf.export_hf(model, out)
    # The model's own tokenizer goes with it (transformers' AutoTokenizer reads it there).
    tokenizers.export_files(run, exp, out)
    write_checksums(out)
    return out
  save_safetensors(model, exp, out, step)
  export_stablehlo(model, out, seq_len=kwargs.get("seq_len", exp.data.seq_len))
  return out
