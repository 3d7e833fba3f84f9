"""``memzoo bench model``: training and decode throughput and memory by model and context length.

For each model (tiny preset unless told otherwise) and context length ``n``:
- train: a jitted forward+backward on ``[batch, n]``: tokens/s, the compiled temporary memory
  and MFU where the device peak is known, from FLOPs counted on the model's shapes
  (``pipelines.bench.flops``: every matmul plus each op's own count, so Pallas kernels count and
  masked attention blocks do not; XLA's cost analysis does neither);
- decode: the time of one ``step`` with ``n`` tokens already in the state (a KV cache grows
  with ``n``; a recurrent state does not), as tokens/s.
On CPU this shows the recurrent models' linear cost growth against attention's quadratic one.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import zoo
from pipelines.bench.flops import train_step_flops
from pipelines.report import markdown_table

# Dense bf16 peak FLOP/s by device kind (public spec sheets); MFU is left blank elsewhere.
PEAK_FLOPS = {
  "NVIDIA H200": 989e12,
  "NVIDIA H100 80GB HBM3": 989e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "TPU v5 lite": 197e12,
  "TPU v5p": 459e12,
  "TPU v4": 275e12,
}


def _time(fn, *args, repeats: int = 3) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def bench_one(name: str, length: int, *, batch: int = 1, preset: str = "tiny", **overrides):
  cfg = zoo.config(name, preset, **overrides)
  if hasattr(cfg, "max_len") and cfg.max_len < length + 1:
    import dataclasses

    cfg = dataclasses.replace(cfg, max_len=length + 1)
  model = zoo.build(cfg, rngs=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, length)), jnp.int32)

  def loss(p, x):
    logits, _ = nnx.merge(graphdef, p, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()

  train = jax.jit(jax.value_and_grad(loss))
  compiled = train.lower(params, tokens).compile()
  flops = train_step_flops(model, batch, length)
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
  t_train = _time(train, params, tokens)

  gd, state = nnx.split(model)

  @jax.jit
  def step(state, tok, dstate):
    return nnx.merge(gd, state).step(tok, dstate)

  dstate = model.init_state(batch, length + 1)
  _, dstate = step(state, tokens, dstate)  # fill the state with `length` tokens
  one = tokens[:, :1]
  t_decode = _time(lambda: step(state, one, dstate)[0])
  peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
  return {
    "model": name,
    "length": length,
    "train_tok_s": batch * length / t_train,
    "train_ms": 1e3 * t_train,
    "train_mem_MB": temp / 2**20,
    "train_tflops": flops / t_train / 1e12,
    "mfu": (flops / t_train / peak) if peak and flops else None,
    "decode_tok_s": batch / t_decode,
    "decode_ms": 1e3 * t_decode,
  }


def bench_model(
  models: tuple[str, ...] | None = None, lengths: tuple[int, ...] = (256, 1024, 4096), **kw: Any
) -> list[dict[str, Any]]:
  models = models or tuple(zoo.list_models())
  rows = []
  for name in models:
    for n in lengths:
      try:
        rows.append(bench_one(name, n, **kw))
      except Exception as e:  # noqa: BLE001 - a model that cannot run a length is reported
        rows.append({"model": name, "length": n, "error": f"{type(e).__name__}: {e}"[:120]})
  return rows


def format_table(rows: list[dict[str, Any]]) -> str:
  cols = [
    "model",
    "length",
    "train_tok_s",
    "train_ms",
    "train_mem_MB",
    "train_tflops",
    "mfu",
    "decode_tok_s",
    "decode_ms",
  ]
  if any("error" in r for r in rows):
    cols.append("error")
  return markdown_table(rows, cols)


def run_cli(argv: list[str]) -> list[dict[str, Any]]:
  import argparse

  p = argparse.ArgumentParser(prog="memzoo bench model")
  p.add_argument("--models", default=None, help="comma-separated families (default: all)")
  p.add_argument("--lengths", default="256,1024,4096")
  p.add_argument("--batch", type=int, default=1)
  a = p.parse_args(argv)
  models = tuple(a.models.split(",")) if a.models else None
  return bench_model(models, tuple(int(x) for x in a.lengths.split(",")), batch=a.batch)
