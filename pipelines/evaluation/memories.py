"""Training-free memories on a run's transformer: the same weights under plain attention,
StreamingLLM, InfLLM, EM-LLM or DuoAttention, sized from the model's trained length ``L``.

Every method gets about the same attention budget, ``L`` keys per query: StreamingLLM keeps 4
sinks + ``L - 4`` recent tokens; InfLLM / EM-LLM keep 4 sinks + ``L / 2`` recent tokens +
``top_k`` retrieved blocks (events) of ``L / 8`` tokens; Duo keeps full attention on the half of
the KV heads whose fitted gates are highest (DuoAttention deploys at a target fraction of
retrieval heads) and 4 sinks + ``L / 4`` recent tokens on the others.
``none`` is the plain transformer (RoPE positions past ``L`` unchanged).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from pipelines.errors import InputError

METHODS = ("none", "streaming", "infllm", "emllm", "duo")
SINKS = 4
DUO_RETRIEVAL_FRACTION = 0.5


def options(method: str, train_len: int) -> dict[str, Any]:
  """The wrapper options of ``method`` for a model trained at ``train_len`` tokens."""
  n = int(train_len)
  if n < 16:
    raise InputError(f"the trained length {n} is too short for the memory methods (>= 16)")
  if method == "streaming":
    return {"sinks": SINKS, "window": n - SINKS}
  if method in ("infllm", "emllm"):
    block = max(n // 8, 2)
    window = n // 2
    opts = {
      "sinks": SINKS,
      "window": window,
      "block_size": block,
      "top_k": 4,
      "n_repr": min(4, block),
      "chunk_size": window,
    }
    if method == "emllm":
      opts.update(
        segmentation="surprise",
        min_event=max(min(4, block), block // 4),
        top_k=2,
        neighbours=1,
        refine=2,
      )
    return opts
  if method == "duo":
    return {"sinks": SINKS, "window": max(n // 4, 1)}
  if method == "none":
    return {}
  raise InputError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def backbone_for(model: nnx.Module, max_len: int) -> nnx.Module:
  """``model`` (a transformer) with room for ``max_len`` positions, same parameters."""
  import zoo

  cfg = model.config
  if getattr(cfg, "family", None) != "transformer":
    raise InputError(f"the memory methods wrap a transformer; this run's model is {cfg.family!r}")
  if cfg.max_len >= max_len:
    return model
  fresh = zoo.build(dataclasses.replace(cfg, max_len=int(max_len)), rngs=0)
  nnx.update(fresh, nnx.state(model, nnx.Param))
  return fresh


def wrap(
  model: nnx.Module,
  method: str,
  train_len: int,
  max_len: int,
  *,
  duo_batches: Callable[[], list[np.ndarray]] | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
  """(the model under ``method``, the options used) for inputs up to ``max_len`` tokens.

  ``duo_batches``: token batches ``[B, T]`` to fit Duo's head gates on (required for ``duo``;
  the backbone stays frozen, only one gate per KV head is fitted, as in the paper).
  """
  opts = options(method, train_len)
  base = backbone_for(model, max_len)
  if method == "none":
    return base, opts
  if method == "streaming":
    from zoo.streaming import from_transformer
  elif method in ("infllm", "emllm"):
    from zoo.infllm import from_transformer
  else:
    from zoo.duo import from_transformer, optimize_gates, retrieval_heads_from_gates

    if duo_batches is None:
      raise InputError("duo needs token batches to fit its retrieval-head gates")
    gated = from_transformer(base, **opts)
    gates = optimize_gates(gated, duo_batches())
    # The top fraction of gates over all layers (ties broken by position), not a fixed
    # threshold: a briefly fitted model can leave every gate above 0.5.
    keep = max(1, round(DUO_RETRIEVAL_FRACTION * gates.size))
    order = np.argsort(-gates.ravel(), kind="stable")[:keep]
    mask = np.zeros(gates.size, bool)
    mask[order] = True
    heads = retrieval_heads_from_gates(mask.reshape(gates.shape).astype(np.float32))
    opts = {**opts, "retrieval_heads": heads, "gates": np.round(gates, 3).tolist()}
    return from_transformer(base, **{k: v for k, v in opts.items() if k != "gates"}), opts
  return from_transformer(base, **opts), opts


def chunk_size(model: nnx.Module, train_len: int) -> int:
  """Tokens per decode step when streaming a long input through ``model``."""
  return int(getattr(model.config, "chunk_size", train_len))


def state_bytes(model: nnx.Module, length: int) -> int:
  """Bytes of the decode state (the KV cache or memory) for one sequence of ``length`` tokens,
  from shapes only (nothing is allocated). Offloaded host stores are not counted."""
  shapes = jax.eval_shape(lambda: model.init_state(1, length))
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes)))
