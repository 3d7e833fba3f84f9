"""Hugging Face config.json <-> memzoo transformer config, through an allow-list.

Every config.json key is inert (``INERT_KEYS``), read and reproduced, or refused with its name
and value; RoPE is read from either layout (top-level ``rope_theta``/``rope_scaling``, or
transformers 5's ``rope_parameters``) and every type transformers defines for these families
(default, linear, dynamic, yarn, llama3, longrope) is reproduced (``zoo.layers.rope``);
Qwen2/Qwen3 sliding windows apply to the layers ``layer_types`` / ``max_window_layers`` mark.
``export_target`` names the transformers architecture that holds a memzoo config exactly.
Weights and the import/export jobs are in ``pipelines.interchange.hf``.
"""

from __future__ import annotations

from typing import Any

from pipelines.errors import UnsupportedModelError

ARCHITECTURES = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "mistral",
  "Qwen2ForCausalLM": "qwen2",
  "Qwen3ForCausalLM": "qwen3",
}

# config.json keys that never change the forward pass: bookkeeping, token ids, training-only
# settings and generation defaults. Every other key must be understood below or is refused.
INERT_KEYS = frozenset(
  {
    "architectures",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "initializer_range",
    "use_cache",
    "attention_dropout",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "tokenizer_class",
    "id2label",
    "label2id",
    "problem_type",
    "pretraining_tp",  # splits Llama's matmuls into slices: the same products
    "is_decoder",
    "is_encoder_decoder",
    "tie_encoder_decoder",
    "add_cross_attention",
    "chunk_size_feed_forward",
    "task_specific_params",
    "max_length",
    "bad_words_ids",
  }
)
# Keys the import reads, per family (shared ones first).
COMMON_KEYS = frozenset(
  {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "hidden_act",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
  }
)
FAMILY_KEYS = {
  "llama": {"attention_bias", "mlp_bias"},
  "mistral": {"sliding_window"},
  "qwen2": {
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "use_mrope",
  },
  "qwen3": {
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "attention_bias",
  },
}
# Keys memzoo reads but reproduces for these values only.
ONLY_VALUES = {
  "hidden_act": ("silu",),
  "mlp_bias": (False, None),
  "partial_rotary_factor": (1, 1.0, None),
  "use_mrope": (False, None),
}
# RoPE types of transformers' ``modeling_rope_utils`` and the keys each one reads.
ROPE_KEYS = {
  "default": set(),
  "linear": {"factor"},
  "dynamic": {"factor"},
  "yarn": {
    "factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
  },
  "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
  "longrope": {"factor", "original_max_position_embeddings", "short_factor", "long_factor"}
  | {"attention_factor"},
}
# Defaults of transformers' config classes for keys a config.json may omit (transformers fills
# them in, so they change the model as much as written ones).
FAMILY_DEFAULTS = {
  "llama": {"max_position_embeddings": 2048},
  "mistral": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
  "qwen2": {"max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28},
  "qwen3": {"max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28},
}


def export_target(cfg: Any) -> str:
  """The ``transformers`` architecture that holds ``cfg`` exactly (Llama, Qwen2 or Qwen3).

  Raises:
    UnsupportedModelError: nothing in ``transformers`` holds this combination.
  """
  if cfg.family != "transformer":
    raise UnsupportedModelError(f"HF export covers the transformer family, not {cfg.family!r}")
  if cfg.conv_width:
    raise UnsupportedModelError(
      f"HF Llama/Qwen have no q/k/v convolutions; this model has conv_width={cfg.conv_width}"
    )
  if cfg.window is not None and cfg.sinks:
    raise UnsupportedModelError(
      f"HF sliding windows have no attention sinks; this model has sinks={cfg.sinks}"
    )
  if cfg.qk_norm:
    if cfg.qkv_bias != cfg.out_bias:
      raise UnsupportedModelError(
        "HF Qwen3 (q/k norms) has biases on all of q, k, v, o or none; this model has "
        f"qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}"
      )
    return "Qwen3ForCausalLM"
  if cfg.window is not None or (cfg.qkv_bias and not cfg.out_bias):
    if cfg.out_bias:
      raise UnsupportedModelError(
        "HF Qwen2 (sliding windows per layer) has no bias on the output projection; this model "
        "has out_bias=True with a window"
      )
    return "Qwen2ForCausalLM"
  if cfg.out_bias and not cfg.qkv_bias:
    raise UnsupportedModelError(
      "HF Llama's attention_bias covers q, k, v and o together; this model has out_bias only"
    )
  return "LlamaForCausalLM"


def config_to_hf(cfg: Any) -> dict[str, Any]:
  """A ``transformers`` config dict (Llama, Qwen2 or Qwen3, see ``export_target``)."""
  arch = export_target(cfg)
  family = ARCHITECTURES[arch]
  out: dict[str, Any] = {
    "architectures": [arch],
    "model_type": family,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.d_ff,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "head_dim": cfg.resolved_head_dim,
    "max_position_embeddings": cfg.max_len,
    "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
    "hidden_act": "silu",
    "torch_dtype": getattr(cfg, "param_dtype", "float32"),
  }
  if family == "llama":
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
  if family == "qwen3":
    out["attention_bias"] = cfg.qkv_bias
  if family in ("qwen2", "qwen3"):
    sliding = [cfg.layer_window(i) is not None for i in range(cfg.n_layers)]
    out.update(
      use_sliding_window=cfg.window is not None,
      sliding_window=cfg.window,
      max_window_layers=cfg.n_layers,
      layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
    )
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_base}
  s = cfg.rope_scaling
  kind = "none" if s is None else s.kind
  if kind == "linear":
    rope.update(rope_type="linear", factor=s.factor)
  elif kind == "dynamic_ntk":
    rope.update(rope_type="dynamic", factor=s.factor)
    # transformers measures dynamic NTK against max_position_embeddings.
    out["max_position_embeddings"] = s.original_max_len
  elif kind == "yarn":
    rope.update(
      rope_type="yarn",
      factor=s.factor,
      original_max_position_embeddings=s.original_max_len,
      beta_fast=s.beta_fast,
      beta_slow=s.beta_slow,
      truncate=s.truncate,
    )
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
      if getattr(s, key) is not None:
        rope[key] = getattr(s, key)
  elif kind == "llama3":
    rope.update(
      rope_type="llama3",
      factor=s.factor,
      original_max_position_embeddings=s.original_max_len,
      low_freq_factor=s.low_freq_factor,
      high_freq_factor=s.high_freq_factor,
    )
  elif kind == "longrope":
    rope.update(
      rope_type="longrope",
      factor=s.factor,
      original_max_position_embeddings=s.original_max_len,
      short_factor=list(s.short_factor),
      long_factor=list(s.long_factor),
    )
    if s.attention_factor is not None:
      rope["attention_factor"] = s.attention_factor
  elif kind != "none":
    raise UnsupportedModelError(f"rope_scaling.kind={kind!r} has no transformers equivalent")
  out["rope_parameters"] = rope
  return out


def _rope_section(hf: dict[str, Any], max_len: int, source: str) -> tuple[float, dict | None]:
  """(rope_theta, memzoo ``rope_scaling`` dict or None) from either config.json layout."""
  scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
  # transformers reads a legacy ``rope_scaling`` first, then ``rope_parameters`` (transformers
  # 5); ``rope_theta`` inside the dict wins over the top-level key.
  rope = scaling or params or {}
  if not isinstance(rope, dict):
    raise UnsupportedModelError(f"{source}: rope parameters {rope!r} are not a mapping")
  if scaling and params and any(params.get(k, v) != v for k, v in scaling.items()):
    raise UnsupportedModelError(
      f"{source}: rope_scaling={scaling!r} and rope_parameters={params!r} disagree"
    )
  if any(isinstance(v, dict) for v in rope.values()):
    raise UnsupportedModelError(
      f"{source}: per-layer-type RoPE parameters {sorted(rope)} are not supported"
    )
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ROPE_KEYS:
    raise UnsupportedModelError(
      f"{source}: rope_type={kind!r} is not supported; memzoo reproduces {sorted(ROPE_KEYS)}"
    )
  known = ROPE_KEYS[kind] | {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
  for key, value in rope.items():
    if key not in known:
      raise UnsupportedModelError(
        f"{source}: rope key {key!r} (= {value!r}) is not understood for rope_type={kind!r}"
      )
  if rope.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
    raise UnsupportedModelError(
      f"{source}: partial_rotary_factor={rope['partial_rotary_factor']!r}; memzoo rotates the "
      "whole head"
    )
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if kind == "default":
    return theta, None
  # As transformers: a top-level original_max_position_embeddings wins (Phi3 style), then the
  # one in the dict, then max_position_embeddings.
  orig = int(
    hf.get("original_max_position_embeddings")
    or rope.get("original_max_position_embeddings")
    or max_len
  )

  def factor(default: float | None = None) -> float:
    f = rope.get("factor")
    if f is None:
      if default is None:
        raise UnsupportedModelError(f"{source}: rope_type={kind!r} needs a 'factor'")
      return default
    return float(f)

  if kind == "linear":
    return theta, {"kind": "linear", "factor": factor()}
  if kind == "dynamic":
    # transformers' dynamic NTK grows beyond max_position_embeddings, not an original length.
    return theta, {"kind": "dynamic_ntk", "factor": factor(), "original_max_len": max_len}
  if kind == "yarn":
    out = {
      "kind": "yarn",
      "factor": factor(max_len / orig),
      "original_max_len": orig,
      "beta_fast": float(rope.get("beta_fast") or 32),
      "beta_slow": float(rope.get("beta_slow") or 1),
      "truncate": bool(rope.get("truncate", True)),
    }
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
      if rope.get(key) is not None:
        out[key] = float(rope[key])
    return theta, out
  if kind == "llama3":
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
      if rope.get(key) is None:
        raise UnsupportedModelError(f"{source}: rope_type='llama3' needs {key!r}")
    return theta, {
      "kind": "llama3",
      "factor": factor(),
      "original_max_len": orig,
      "low_freq_factor": float(rope["low_freq_factor"]),
      "high_freq_factor": float(rope["high_freq_factor"]),
    }
  # longrope
  for key in ("short_factor", "long_factor"):
    if not isinstance(rope.get(key), list):
      raise UnsupportedModelError(f"{source}: rope_type='longrope' needs a list {key!r}")
  out = {
    "kind": "longrope",
    "factor": factor(max_len / orig),
    "original_max_len": orig,
    "short_factor": [float(x) for x in rope["short_factor"]],
    "long_factor": [float(x) for x in rope["long_factor"]],
  }
  if rope.get("attention_factor") is not None:
    out["attention_factor"] = float(rope["attention_factor"])
  return theta, out


def _windows(hf: dict[str, Any], family: str, n_layers: int, source: str) -> dict[str, Any]:
  """``window`` / ``window_layers`` as transformers applies them per layer."""
  if family == "llama":
    return {}
  if family == "mistral":  # one window for every layer
    w = hf.get("sliding_window")
    return {"window": int(w)} if w else {}
  # Qwen2/Qwen3: the window applies only when use_sliding_window, and only to the layers that
  # layer_types (or, without it, max_window_layers) marks as sliding.
  w = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
  types = hf.get("layer_types")
  if types is None:
    first = hf["max_window_layers"]
    types = [
      "sliding_attention" if w is not None and i >= first else "full_attention"
      for i in range(n_layers)
    ]
  if len(types) != n_layers or not set(types) <= {"full_attention", "sliding_attention"}:
    raise UnsupportedModelError(
      f"{source}: layer_types={types!r}; memzoo reads {n_layers} of full_attention / "
      "sliding_attention"
    )
  sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
  if not w or not sliding:
    return {}
  out: dict[str, Any] = {"window": int(w)}
  if len(sliding) < n_layers:
    out["window_layers"] = list(sliding)
  return out


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
  """memzoo ``model`` section (``name: transformer`` + fields) for an HF config dict.

  Every key is either inert (``INERT_KEYS``), read and reproduced, or refused: nothing that
  could change the model's outputs is silently dropped.

  Raises:
    UnsupportedModelError: an architecture, key or value memzoo's transformer does not have,
      named in the message.
  """
  arch = (hf.get("architectures") or [None])[0]
  if arch not in ARCHITECTURES:
    raise UnsupportedModelError(
      f"{source}: architecture {arch!r} is not supported; memzoo imports {sorted(ARCHITECTURES)}"
    )
  family = ARCHITECTURES[arch]
  allowed = INERT_KEYS | COMMON_KEYS | FAMILY_KEYS[family]
  for key, value in hf.items():
    if key not in allowed:
      raise UnsupportedModelError(
        f"{source}: key {key!r} (= {value!r}) is not understood for {arch}; memzoo refuses "
        "keys that may change the model rather than ignore them"
      )
    if key in ONLY_VALUES and value not in ONLY_VALUES[key]:
      raise UnsupportedModelError(
        f"{source}: {key}={value!r} is not supported (memzoo reproduces {ONLY_VALUES[key]})"
      )
  hf = {**FAMILY_DEFAULTS[family], **hf}
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  n_layers = hf["num_hidden_layers"]
  max_len = int(hf["max_position_embeddings"])
  theta, scaling = _rope_section(hf, max_len, source)
  bias = bool(hf.get("attention_bias", False))
  model: dict[str, Any] = {
    "name": "transformer",
    "vocab_size": hf["vocab_size"],
    "d_model": d,
    "n_layers": n_layers,
    "n_heads": h,
    "n_kv_heads": hf.get("num_key_value_heads") or h,
    "head_dim": hf.get("head_dim") or d // h,
    "d_ff": hf["intermediate_size"],
    "max_len": max_len,
    "rope_base": theta,
    "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    # Qwen2 always has q/k/v biases; Llama/Qwen3 attention_bias puts one on o as well.
    "qkv_bias": family == "qwen2" or bias,
    "out_bias": bias,
    "qk_norm": family == "qwen3",
    **_windows(hf, family, n_layers, source),
  }
  if scaling is not None:
    model["rope_scaling"] = scaling
  return model
