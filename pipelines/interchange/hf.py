"""Hugging Face <-> memzoo for the transformer family (Llama, Mistral, Qwen2/2.5, Qwen3).

Weights: HF ``nn.Linear`` stores ``[out, in]``; memzoo keeps ``wq [D,H,Dh]``, ``wk/wv [D,K,Dh]``,
``wo [H,Dh,D]`` and ``[in, out]`` MLP matrices, so every projection is a transpose plus a
reshape. Both use RoPE in the rotate-half layout and ``1/sqrt(Dh)`` attention scaling, so no
permutation of heads is needed.

Config reading cannot be silently wrong: every config.json key is inert (``INERT_KEYS``), read
and reproduced, or refused with its name and value; RoPE is read from either layout (top-level
``rope_theta``/``rope_scaling``, or transformers 5's ``rope_parameters``) and every type
transformers defines for these families (default, linear, dynamic, yarn, llama3, longrope) is
reproduced formula for formula (``zoo.layers.rope``); Qwen2/Qwen3 sliding windows apply to the
layers ``layer_types`` / ``max_window_layers`` mark; q/k/v (and o) biases and Qwen3's per-head
q/k RMSNorm are model features. Any tensor without a place is refused too.

``import_hf(dir, run_dir)`` writes a memzoo run (``config.yaml`` plus an Orbax checkpoint at
step 0 holding the parameters only) that ``load_run``, ``memzoo eval``, ``memzoo extrapolate``
and ``memzoo train`` (which then creates the optimizer state) accept. Weights are read tensor
by tensor in their stored dtype and placed on the run's mesh, so peak host memory is about one
copy of the weights. ``export_hf(model, out)`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads, as Llama, Qwen2 or Qwen3
(``export_target``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from pipelines import config as config_lib
from pipelines.data import hf_tokenizer as tokenizers
from pipelines.errors import InputError, MissingFileError, UnsupportedModelError
from pipelines.interchange.hf_config import (  # noqa: F401  (public names of the HF interchange)
  ARCHITECTURES,
  config_from_hf,
  config_to_hf,
  export_target,
)
from pipelines.interchange.safetensors_io import (
  CHECKSUMS,
  CorruptFileError,
  flat_params,
  verify_checksums,
)
from pipelines.rundir import atomic_write_text


def _weight_plan(cfg: Any) -> dict[str, tuple[str, tuple[int, ...], Any]]:
  """``{memzoo name: (HF name, HF shape, HF array -> memzoo array)}`` for ``cfg``.

  HF ``nn.Linear`` stores ``[out, in]``; memzoo keeps ``wq [D,H,Dh]``, ``wk/wv [D,K,Dh]``,
  ``wo [H,Dh,D]`` and ``[in, out]`` MLP matrices: a transpose plus a reshape each.
  """
  d, h, k, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff
  same = lambda w: w  # noqa: E731
  t = lambda w: w.T  # noqa: E731
  plan = {
    "embed": ("model.embed_tokens.weight", (cfg.vocab_size, d), same),
    "final_norm.scale": ("model.norm.weight", (d,), same),
  }
  if not cfg.tie_embeddings:
    plan["unembed"] = ("lm_head.weight", (cfg.vocab_size, d), t)
  for i in range(cfg.n_layers):
    m, p = f"blocks.{i}.", f"model.layers.{i}."
    plan[m + "attn_norm.scale"] = (p + "input_layernorm.weight", (d,), same)
    plan[m + "mlp_norm.scale"] = (p + "post_attention_layernorm.weight", (d,), same)
    for x, heads in (("q", h), ("k", k), ("v", k)):
      plan[m + f"attn.w{x}"] = (
        p + f"self_attn.{x}_proj.weight",
        (heads * dh, d),
        lambda w, heads=heads: w.T.reshape(d, heads, dh),
      )
      if cfg.qkv_bias:
        plan[m + f"attn.bias.{x}"] = (
          p + f"self_attn.{x}_proj.bias",
          (heads * dh,),
          lambda w, heads=heads: w.reshape(heads, dh),
        )
    plan[m + "attn.wo"] = (
      p + "self_attn.o_proj.weight",
      (d, h * dh),
      lambda w: w.T.reshape(h, dh, d),
    )
    if cfg.out_bias:
      plan[m + "attn.out_bias"] = (p + "self_attn.o_proj.bias", (d,), same)
    if cfg.qk_norm:
      plan[m + "attn.q_norm.scale"] = (p + "self_attn.q_norm.weight", (dh,), same)
      plan[m + "attn.k_norm.scale"] = (p + "self_attn.k_norm.weight", (dh,), same)
    plan[m + "mlp.w_gate"] = (p + "mlp.gate_proj.weight", (f, d), t)
    plan[m + "mlp.w_up"] = (p + "mlp.up_proj.weight", (f, d), t)
    plan[m + "mlp.w_down"] = (p + "mlp.down_proj.weight", (d, f), t)
  return plan


def to_hf_weights(weights: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
  """memzoo flat parameters -> HF tensor names and ``[out, in]`` layouts, in the parameters'
  storage dtype (``cfg.param_dtype``: an imported bfloat16 model exports bfloat16)."""
  d, dh = cfg.d_model, cfg.resolved_head_dim
  dtype = _NP_DTYPES[getattr(cfg, "param_dtype", "float32")]
  out = {}
  for ours, (theirs, shape, _) in _weight_plan(cfg).items():
    w = np.asarray(weights[ours]).astype(dtype, copy=False)
    if ours.endswith(("attn.wq", "attn.wk", "attn.wv")):
      w = w.reshape(d, -1).T
    elif ours.endswith("attn.wo"):
      w = w.reshape(-1, d).T
    elif ours == "unembed" or ".mlp." in ours:
      w = w.T
    out[theirs] = np.ascontiguousarray(w.reshape(shape))
  # Qwen2 always has q/k/v biases: a model without them exports zeros, which is the same.
  if export_target(cfg) == "Qwen2ForCausalLM" and not cfg.qkv_bias:
    for i in range(cfg.n_layers):
      p = f"model.layers.{i}.self_attn."
      for x, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
        out[p + f"{x}_proj.bias"] = np.zeros((heads * dh,), dtype)
  return out


def export_hf(model: nnx.Module, out: str | Path) -> Path:
  """Writes ``out/{config.json, model.safetensors}`` as the ``transformers`` architecture that
  holds the model (``export_target``: Llama, Qwen2 or Qwen3); returns ``out``."""
  from safetensors.numpy import save_file

  cfg = model.config
  hf_cfg = config_to_hf(cfg)  # refuses what HF cannot express before anything is written
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  save_file(
    to_hf_weights(flat_params(model), cfg),
    str(out / "model.safetensors"),
    metadata={"format": "pt"},
  )
  (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  return out


# safetensors dtype names -> numpy dtypes (bfloat16 through ml_dtypes, as JAX uses it).
_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_PARAM_DTYPES = {"F32": "float32", "F64": "float32", "F16": "float16", "BF16": "bfloat16"}


class SafetensorsIndex:
  """The tensors of one or more safetensors files, read one at a time on request.

  Only the headers are read up front (names, dtypes, shapes, offsets, checked against the file
  sizes); ``read(name)`` then reads that tensor's bytes, in its stored dtype. Nothing is mapped
  or kept, so reading a model tensor by tensor holds one tensor at a time.
  """

  def __init__(self, files: list[Path]):
    self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
    for path in files:
      size = path.stat().st_size
      try:
        with open(path, "rb") as f:
          n = int(np.frombuffer(f.read(8), "<u8")[0])
          if n > size - 8:
            raise InputError(f"header of {n} bytes in a {size}-byte file")
          header = json.loads(f.read(n))
      except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise CorruptFileError(
          f"{path}: not a readable safetensors file (truncated?): {e}"
        ) from None
      for name, info in header.items():
        if name == "__metadata__":
          continue
        start, end = info["data_offsets"]
        if 8 + n + end > size:
          raise CorruptFileError(
            f"{path}: tensor {name!r} ends at byte {8 + n + end} of a {size}-byte file (truncated)"
          )
        self.entries[name] = (path, info["dtype"], tuple(info["shape"]), 8 + n + start, 8 + n + end)

  def names(self) -> set[str]:
    return set(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.entries[name][2]

  def dtype(self, name: str) -> str:
    return self.entries[name][1]

  def read(self, name: str) -> np.ndarray:
    path, dtype, shape, start, end = self.entries[name]
    if dtype not in _DTYPES:
      raise CorruptFileError(
        f"{path}: tensor {name!r} has dtype {dtype}; memzoo reads {list(_DTYPES)}"
      )
    count = int(np.prod(shape, dtype=np.int64))
    w = np.fromfile(path, dtype=_DTYPES[dtype], count=count, offset=start)
    if w.size != count or w.nbytes != end - start:
      raise CorruptFileError(f"{path}: tensor {name!r} is truncated")
    return w.reshape(shape)


def open_hf(directory: str | Path) -> tuple[dict[str, Any], SafetensorsIndex]:
  """(config.json dict, tensor index) of an HF directory (one or several safetensors shards)."""
  directory = Path(directory)
  if not (directory / "config.json").is_file():
    raise MissingFileError(f"{directory} has no config.json; is it a Hugging Face model directory?")
  if (directory / CHECKSUMS).is_file():  # a memzoo export: its files must match
    verify_checksums(directory)
  hf_cfg = json.loads((directory / "config.json").read_text())
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise MissingFileError(f"{directory} has no *.safetensors weights (PyTorch .bin is not read)")
  return hf_cfg, SafetensorsIndex(files)


def read_hf(directory: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, all tensors in memory); for small models and tests."""
  hf_cfg, index = open_hf(directory)
  return hf_cfg, {n: index.read(n) for n in sorted(index.names())}


def stored_param_dtype(index: SafetensorsIndex) -> str:
  """memzoo ``param_dtype`` of a checkpoint: the dtype its embedding is stored in."""
  return _PARAM_DTYPES.get(index.dtype("model.embed_tokens.weight"), "float32")


def check_tensors(index: SafetensorsIndex, cfg: Any, source: str) -> None:
  """Every tensor ``cfg`` needs is there with its shape, and nothing else is (before reading).

  Raises:
    CorruptFileError: a missing or mis-shaped tensor.
    UnsupportedModelError: a tensor memzoo has no place for (e.g. an o_proj bias).
  """
  plan = _weight_plan(cfg)
  for _, (name, shape, _) in plan.items():
    if name not in index.entries:
      raise CorruptFileError(f"{source}: tensor {name!r} is missing")
    if index.shape(name) != shape:
      raise CorruptFileError(
        f"{source}: tensor {name!r} has shape {index.shape(name)}, config.json implies {shape}"
      )
  wanted = {name for name, _, _ in plan.values()}
  for name in sorted(index.names() - wanted):
    if name.endswith("rotary_emb.inv_freq"):  # a buffer of old checkpoints, recomputed
      continue
    if name == "lm_head.weight" and cfg.tie_embeddings:
      # Tied: transformers uses the embedding; a different stored head would be a silent lie.
      if not np.array_equal(index.read(name), index.read("model.embed_tokens.weight")):
        raise UnsupportedModelError(
          f"{source}: tie_word_embeddings=true but lm_head.weight differs from the embedding"
        )
      continue
    raise UnsupportedModelError(
      f"{source}: tensor {name!r} has no place in this {cfg.n_layers}-layer transformer "
      f"(qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}, qk_norm={cfg.qk_norm})"
    )


def read_params(
  index: SafetensorsIndex, cfg: Any, abstract: nnx.State, shardings: Any = None
) -> nnx.State:
  """The ``nnx.Param`` state of ``cfg`` filled tensor by tensor from ``index``.

  Each tensor is read in its stored dtype, transposed/reshaped to memzoo's layout, cast to the
  parameter's dtype and placed on its device(s) (``shardings``: a matching tree of
  ``NamedSharding``, or None for the default device) before the next one is read.
  """
  plan = _weight_plan(cfg)
  flat_shardings = None
  if shardings is not None:
    flat_shardings = {".".join(str(p) for p in path): s for path, s in nnx.to_flat_state(shardings)}
  out = []
  for path, var in nnx.to_flat_state(abstract):
    name = ".".join(str(p) for p in path)
    hf_name, _, transform = plan[name]
    want = var.get_value()
    w = transform(index.read(hf_name)).astype(want.dtype, copy=False)
    if tuple(w.shape) != tuple(want.shape):
      raise CorruptFileError(f"tensor {hf_name!r} maps to {w.shape}, the model has {want.shape}")
    target = flat_shardings[name] if flat_shardings is not None else None
    value = jax.device_put(w, target) if target is not None else jnp.asarray(w)
    del w
    out.append((path, var.replace(value)))
  return nnx.from_flat_state(out)


def load_hf(directory: str | Path, **model_overrides: Any):
  """(memzoo TransformerConfig, model with the HF weights) of an HF directory."""
  import zoo

  hf_cfg, index = open_hf(directory)
  section = config_from_hf(hf_cfg, str(Path(directory) / "config.json"))
  section.pop("name")
  dt = stored_param_dtype(index)
  section = {"param_dtype": dt, "dtype": dt, **section, **model_overrides}
  cfg = zoo.config("transformer", "tiny", **section)
  check_tensors(index, cfg, str(directory))
  graphdef, abstract, rest = nnx.split(
    nnx.eval_shape(lambda: zoo.build(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...
  )
  params = read_params(index, cfg, abstract)
  return cfg, nnx.merge(graphdef, params, rest)


def import_hf(
  directory: str | Path, run_dir: str | Path, overrides: list[str] | None = None, **sections: Any
) -> Path:
  """Turns an HF directory into a memzoo run at ``run_dir`` (config.yaml + step-0 checkpoint).

  The config is read and validated and every tensor's shape checked before anything is
  written; then the weights are read one tensor at a time in their stored dtype (bfloat16
  stays bfloat16: ``model.param_dtype`` follows it) and placed on the run's mesh, sharded by
  the parameters' logical axes. The checkpoint holds the parameters only; ``memzoo train`` on
  the run creates the optimizer state when it resumes from it.

  Args:
    directory: local HF model (config.json, *.safetensors, optionally tokenizer.json).
    run_dir: the run to create; must not hold a checkpoint yet.
    overrides: ``key=value`` settings for the run's config (``data.seq_len=256``,
      ``mesh.fsdp=4``, ``model.dtype=float32``), as ``memzoo train`` takes them.
    sections: extra experiment sections (``data``, ``train``, ``mesh``) merged into the config.
  Returns:
    ``run_dir``.

  Raises:
    FileExistsError: ``run_dir`` already holds a checkpoint (checked before reading weights).
    UnsupportedModelError: a config key, RoPE type or tensor memzoo does not reproduce.
  """
  from pipelines import sharding
  from pipelines.run import build_model
  from pipelines.train.checkpoint import Checkpointer

  directory, run_dir = Path(directory), Path(run_dir)
  # Refused before any weight is read: importing would overwrite a trained run's step 0.
  if _has_checkpoint(run_dir):
    raise FileExistsError(f"{run_dir} already holds a checkpoint; import into a new run")
  hf_cfg, index = open_hf(directory)
  source = str(directory / "config.json")
  model_section = config_from_hf(hf_cfg, source)
  dt = stored_param_dtype(index)
  model_section = {**model_section, "param_dtype": dt, "dtype": dt}
  tok_file = next(
    (n for n in ("tokenizer.json", "tokenizer.model") if (directory / n).is_file()), None
  )
  if tok_file is not None:  # the run reads the model's own tokenizer (copied below)
    sections = {**sections, "data": {"tokenizer": tok_file, **(sections.get("data") or {})}}
  # data.seq_len may not exceed model.max_len: a short model trains at its own maximum.
  seq_len = min(config_lib.DataConfig().seq_len, model_section["max_len"])
  raw = {"model": model_section, "run_dir": str(run_dir), "mesh": {"data": 1}}
  raw["data"] = {"seq_len": seq_len}
  raw = config_lib.merge(raw, sections)
  raw = config_lib.merge(raw, config_lib.parse_overrides(overrides or []))
  if raw.get("run_dir") != str(run_dir):
    raise config_lib.ConfigError(f"{source}: run_dir is the import's RUN argument ({run_dir})")
  exp = config_lib.from_dict(raw, source=source)
  check_tensors(index, exp.model, str(directory))
  mesh = sharding.make_mesh(exp.mesh)

  # Shapes only: no parameter is initialised, so the weights are held once (as read).
  _, abstract, _ = jax.eval_shape(lambda: build_model(exp))
  params = read_params(index, exp.model, abstract, sharding.param_shardings(abstract, mesh))

  run_dir.mkdir(parents=True, exist_ok=True)
  ckpt = Checkpointer(run_dir, async_save=False)
  try:
    if ckpt.latest_step() is not None:
      raise FileExistsError(f"{run_dir} already holds a checkpoint; import into a new run")
    config_lib.dump(exp, run_dir / "config.yaml")
    meta = {
      "step": 0,
      "model": "transformer",
      "imported_from": str(directory.absolute()),
      "optimizer": False,
    }
    ckpt.save(0, {"params": params}, None, meta)
  finally:
    ckpt.close()
  tokenizers.copy_files(directory, run_dir)
  atomic_write_text(run_dir / "hf_config.json", json.dumps(hf_cfg, indent=2))
  return run_dir


def _has_checkpoint(run_dir: Path) -> bool:
  from pipelines.train.checkpoint import Checkpointer

  if not (run_dir / "checkpoints").is_dir():
    return False
  ckpt = Checkpointer(run_dir, async_save=False)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()
