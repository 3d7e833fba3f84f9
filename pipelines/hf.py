"""Hugging Face <-> memzoo for the transformer family (Llama, Mistral, Qwen2 layouts).

Weights: HF ``nn.Linear`` stores ``[out, in]``; memzoo keeps ``wq [D,H,Dh]``, ``wk/wv [D,K,Dh]``,
``wo [H,Dh,D]`` and ``[in, out]`` MLP matrices, so every projection is a transpose plus a
reshape. Both use RoPE in the rotate-half layout and ``1/sqrt(Dh)`` attention scaling, so no
permutation of heads is needed.

``import_hf(dir, run_dir)`` writes a memzoo run (``config.yaml`` plus an Orbax checkpoint at
step 0, laid out as ``pipelines.train`` writes it) that ``load_run``, ``memzoo eval`` and
``memzoo extrapolate`` accept; ``export_hf(model, out)`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from pipelines import config as config_lib
from pipelines import tokenizers
from pipelines.export import CorruptFileError, assign_params, flat_params, read_safetensors

ARCHITECTURES = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "mistral",
  "Qwen2ForCausalLM": "qwen2",
}


class UnsupportedModelError(ValueError):
  """An HF checkpoint memzoo cannot represent (architecture, activation, biases, scaling)."""


def config_to_hf(cfg: Any) -> dict[str, Any]:
  """A ``transformers`` LlamaConfig dict for a memzoo ``TransformerConfig``."""
  if cfg.family != "transformer":
    raise UnsupportedModelError(f"HF export covers the transformer family, not {cfg.family!r}")
  if cfg.window is not None or cfg.sinks:
    raise UnsupportedModelError("HF Llama has no sliding window or sinks; export with window=null")
  if cfg.conv_width:
    raise UnsupportedModelError(
      f"HF Llama has no q/k/v convolutions; this model has conv_width={cfg.conv_width}"
    )
  out = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.d_ff,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "head_dim": cfg.resolved_head_dim,
    "max_position_embeddings": cfg.max_len,
    "rope_theta": cfg.rope_base,
    "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float32",
    "rope_scaling": None,
  }
  s = cfg.rope_scaling
  if s is not None and s.kind != "none":
    if s.kind == "linear":
      out["rope_scaling"] = {"rope_type": "linear", "factor": s.factor}
    elif s.kind == "dynamic_ntk":
      out["rope_scaling"] = {"rope_type": "dynamic", "factor": s.factor}
      out["max_position_embeddings"] = s.original_max_len
    else:
      raise UnsupportedModelError(f"rope_scaling.kind={s.kind!r} has no HF Llama equivalent")
  return out


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
  """memzoo ``model`` section (``name: transformer`` + fields) for an HF config dict.

  Raises:
    UnsupportedModelError: an architecture or option memzoo's transformer does not have.
  """
  arch = (hf.get("architectures") or [None])[0]
  if arch not in ARCHITECTURES:
    raise UnsupportedModelError(
      f"{source}: architecture {arch!r} is not supported; memzoo imports {sorted(ARCHITECTURES)}"
    )
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedModelError(f"{source}: hidden_act={act!r}; memzoo's SwiGLU uses silu")
  if hf.get("mlp_bias"):
    raise UnsupportedModelError(f"{source}: mlp_bias=true; memzoo's MLP has no biases")
  if arch == "LlamaForCausalLM" and hf.get("attention_bias"):
    raise UnsupportedModelError(f"{source}: attention_bias=true; memzoo's attention has no biases")
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  model: dict[str, Any] = {
    "name": "transformer",
    "vocab_size": hf["vocab_size"],
    "d_model": d,
    "n_layers": hf["num_hidden_layers"],
    "n_heads": h,
    "n_kv_heads": hf.get("num_key_value_heads") or h,
    "head_dim": hf.get("head_dim") or d // h,
    "d_ff": hf["intermediate_size"],
    "max_len": hf.get("max_position_embeddings", 2048),
    "rope_base": float(hf.get("rope_theta", 10000.0)),
    "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
  }
  window = hf.get("sliding_window")
  if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
    window = None
  if window:
    model["window"] = int(window)
  scaling = hf.get("rope_scaling")
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
      model["rope_scaling"] = {"kind": "linear", "factor": factor}
    elif kind == "dynamic":
      model["rope_scaling"] = {
        "kind": "dynamic_ntk",
        "factor": factor,
        "original_max_len": model["max_len"],
      }
    elif kind == "yarn":
      model["rope_scaling"] = {
        "kind": "yarn",
        "factor": factor,
        "original_max_len": int(scaling.get("original_max_position_embeddings", model["max_len"])),
      }
    else:
      raise UnsupportedModelError(f"{source}: rope_scaling type {kind!r} is not supported")
  return model


def to_hf_weights(weights: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
  """memzoo flat parameters -> HF tensor names and ``[out, in]`` layouts."""
  d = cfg.d_model
  out = {
    "model.embed_tokens.weight": weights["embed"],
    "model.norm.weight": weights["final_norm.scale"],
  }
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = weights["unembed"].T
  for i in range(cfg.n_layers):
    m, p = f"blocks.{i}.", f"model.layers.{i}."
    out[p + "input_layernorm.weight"] = weights[m + "attn_norm.scale"]
    out[p + "post_attention_layernorm.weight"] = weights[m + "mlp_norm.scale"]
    for x in "qkv":
      out[p + f"self_attn.{x}_proj.weight"] = weights[m + f"attn.w{x}"].reshape(d, -1).T
    out[p + "self_attn.o_proj.weight"] = weights[m + "attn.wo"].reshape(-1, d).T
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
      out[p + f"mlp.{theirs}.weight"] = weights[m + f"mlp.{ours}"].T
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def from_hf_weights(hf: dict[str, np.ndarray], cfg: Any, source: str) -> dict[str, np.ndarray]:
  """HF tensors -> memzoo flat parameters; checks every shape against ``cfg``.

  Raises:
    CorruptFileError: a tensor is missing or has the wrong shape.
    UnsupportedModelError: non-zero attention biases (Qwen2) that memzoo cannot hold.
  """
  d, h, k, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in hf:
      raise CorruptFileError(f"{source}: tensor {name!r} is missing")
    w = np.asarray(hf[name], np.float32)
    if w.shape != shape:
      raise CorruptFileError(
        f"{source}: tensor {name!r} has shape {w.shape}, config.json implies {shape}"
      )
    return w

  out = {
    "embed": get("model.embed_tokens.weight", (cfg.vocab_size, d)),
    "final_norm.scale": get("model.norm.weight", (d,)),
  }
  if not cfg.tie_embeddings:
    out["unembed"] = get("lm_head.weight", (cfg.vocab_size, d)).T
  for i in range(cfg.n_layers):
    m, p = f"blocks.{i}.", f"model.layers.{i}."
    out[m + "attn_norm.scale"] = get(p + "input_layernorm.weight", (d,))
    out[m + "mlp_norm.scale"] = get(p + "post_attention_layernorm.weight", (d,))
    for x, heads in (("q", h), ("k", k), ("v", k)):
      w = get(p + f"self_attn.{x}_proj.weight", (heads * dh, d))
      out[m + f"attn.w{x}"] = w.T.reshape(d, heads, dh)
      bias = hf.get(p + f"self_attn.{x}_proj.bias")
      if bias is not None and np.any(np.asarray(bias) != 0):
        raise UnsupportedModelError(
          f"{source}: {p}self_attn.{x}_proj.bias is non-zero; memzoo's attention has no biases"
        )
    out[m + "attn.wo"] = get(p + "self_attn.o_proj.weight", (d, h * dh)).T.reshape(h, dh, d)
    f = cfg.d_ff
    out[m + "mlp.w_gate"] = get(p + "mlp.gate_proj.weight", (f, d)).T
    out[m + "mlp.w_up"] = get(p + "mlp.up_proj.weight", (f, d)).T
    out[m + "mlp.w_down"] = get(p + "mlp.down_proj.weight", (d, f)).T
  return out


def export_hf(model: nnx.Module, out: str | Path) -> Path:
  """Writes ``out/{config.json, model.safetensors}`` in HF Llama layout; returns ``out``."""
  from safetensors.numpy import save_file

  cfg = model.config
  hf_cfg = config_to_hf(cfg)  # refuses what Llama cannot express before anything is written
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  save_file(
    to_hf_weights(flat_params(model), cfg),
    str(out / "model.safetensors"),
    metadata={"format": "pt"},
  )
  (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  return out


def read_hf(directory: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, all tensors) of an HF directory (one or several safetensors shards)."""
  directory = Path(directory)
  if not (directory / "config.json").is_file():
    raise FileNotFoundError(
      f"{directory} has no config.json; is it a Hugging Face model directory?"
    )
  hf_cfg = json.loads((directory / "config.json").read_text())
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{directory} has no *.safetensors weights (PyTorch .bin is not read)")
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    tensors.update(read_safetensors(f))
  return hf_cfg, tensors


def load_hf(directory: str | Path, **model_overrides: Any):
  """(memzoo TransformerConfig, model with the HF weights) of an HF directory."""
  import zoo

  hf_cfg, tensors = read_hf(directory)
  section = config_from_hf(hf_cfg, str(Path(directory) / "config.json"))
  section.pop("name")
  section.update(model_overrides)
  cfg = zoo.config("transformer", "tiny", **section)
  model = zoo.build(cfg, rngs=nnx.Rngs(0))
  weights = from_hf_weights(tensors, cfg, str(directory))
  assign_params(model, weights, str(directory))
  return cfg, model


def import_hf(directory: str | Path, run_dir: str | Path, **sections: Any) -> Path:
  """Turns an HF directory into a memzoo run at ``run_dir`` (config.yaml + step-0 checkpoint).

  Args:
    directory: local HF model (config.json, *.safetensors, optionally tokenizer.json).
    run_dir: the run to create; must not hold a checkpoint yet.
    sections: extra experiment sections (``data``, ``train``, ``mesh``) merged into the config.
  Returns:
    ``run_dir``.

  Raises:
    FileExistsError: ``run_dir`` already holds a checkpoint (checked before reading weights).
  """
  from pipelines.checkpoint import Checkpointer
  from pipelines.optim import optimizer
  from pipelines.train import build_model

  directory, run_dir = Path(directory), Path(run_dir)
  # Refused before any weight is read: importing would overwrite a trained run's step 0.
  if _has_checkpoint(run_dir):
    raise FileExistsError(f"{run_dir} already holds a checkpoint; import into a new run")
  hf_cfg, tensors = read_hf(directory)
  model_section = config_from_hf(hf_cfg, str(directory / "config.json"))
  tok_file = next(
    (n for n in ("tokenizer.json", "tokenizer.model") if (directory / n).is_file()), None
  )
  if tok_file is not None:  # the run reads the model's own tokenizer (copied below)
    sections = {**sections, "data": {"tokenizer": tok_file, **(sections.get("data") or {})}}
  raw = {"model": model_section, "run_dir": str(run_dir), "mesh": {"data": 1}, **sections}
  exp = config_lib.from_dict(raw, source=str(directory / "config.json"))
  weights = from_hf_weights(tensors, exp.model, str(directory))
  graphdef, params, rest = build_model(exp)
  model = nnx.merge(graphdef, params, rest)
  assign_params(model, weights, str(directory))
  params = nnx.state(model, nnx.Param)

  run_dir.mkdir(parents=True, exist_ok=True)
  ckpt = Checkpointer(run_dir, async_save=False)
  try:
    if ckpt.latest_step() is not None:
      raise FileExistsError(f"{run_dir} already holds a checkpoint; import into a new run")
    config_lib.dump(exp, run_dir / "config.yaml")
    state = {"params": params, "opt": optimizer(exp.train).init(params)}
    meta = {"step": 0, "model": "transformer", "imported_from": str(directory.absolute())}
    ckpt.save(0, state, None, meta)
  finally:
    ckpt.close()
  tokenizers.copy_files(directory, run_dir)
  (run_dir / "hf_config.json").write_text(json.dumps(hf_cfg, indent=2))
  return run_dir


def _has_checkpoint(run_dir: Path) -> bool:
  from pipelines.checkpoint import Checkpointer

  if not (run_dir / "checkpoints").is_dir():
    return False
  ckpt = Checkpointer(run_dir, async_save=False)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()
