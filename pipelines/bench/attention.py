"""Benchmark of ``ops.attention`` against JAX's own attention, forward and forward+backward.

``bench_attention`` times every implementation on every shape with ``jax.block_until_ready``
after a warm-up, and reports milliseconds, TFLOP/s (counting only visible query/key pairs, so a
sink+window mask is credited for the work it needs, not for T x S), and peak memory. Peers on
GPU are ``jax.nn.dot_product_attention(implementation="cudnn")`` and plain XLA
(``implementation="xla"``), given the same mask densely when it is not plain causal.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ops.attention import Mask, decode_attention, dot_product_attention

PEERS = ("jax_cudnn", "jax_xla")
MASKS = {"causal": Mask(), "full": None, "sink_window": Mask(window=1024, sinks=4)}


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmark shape; ``kind="decode"`` means T new queries against an S-long cache."""

  name: str
  B: int
  T: int
  H: int
  K: int
  D: int
  mask: str = "causal"
  S: int | None = None
  kind: str = "attention"


def default_shapes(backend: str | None = None) -> list[Shape]:
  """The issue's target shapes on accelerators; small ones on CPU."""
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return [
      Shape("causal 1k", 1, 1024, 4, 4, 64),
      Shape("causal 2k", 1, 2048, 4, 4, 64),
      Shape("sink+window 4k", 1, 4096, 4, 4, 64, mask="sink_window"),
      Shape("decode 8k", 2, 1, 8, 2, 64, S=8192, kind="decode"),
    ]
  return [
    Shape("causal 2k", 8, 2048, 16, 16, 128),
    Shape("causal 8k", 2, 8192, 16, 16, 128),
    Shape("causal 16k", 1, 16384, 16, 16, 128),
    Shape("sink+window 32k", 1, 32768, 16, 16, 128, mask="sink_window"),
    Shape("decode 128k", 8, 1, 32, 8, 128, S=131072, kind="decode"),
  ]


def default_implementations(backend: str | None = None) -> list[str]:
  backend = backend or jax.default_backend()
  return {
    "cpu": ["xla", "jax_xla"],
    "gpu": ["pallas_gpu", "xla", "jax_cudnn", "jax_xla"],
    "tpu": ["pallas_tpu", "xla", "jax_xla"],
  }.get(backend, ["xla"])


def visible_pairs(mask: Mask | None, t: int, s: int) -> int:
  """Exact number of visible (query, key) pairs, queries at positions ``s - t + i``."""
  if mask is None:
    return t * s
  total = 0
  for p in range(s - t, s):
    head, lo, hi = mask.key_ranges(p, p + 1, s)
    total += head + (hi - lo)
  return total


def _dense_mask(mask: Mask | None, t: int, s: int):
  if mask is None:
    return None
  return mask.visible(jnp.arange(s - t, s)[:, None], jnp.arange(s)[None, :])[None, None]


def _attention_fn(name: str, shape: Shape):
  mask = MASKS[shape.mask]
  if shape.kind == "decode":
    if name in PEERS:
      impl = "cudnn" if name == "jax_cudnn" else "xla"
      return lambda q, k, v, n: jax.nn.dot_product_attention(
        q, k, v, is_causal=False, key_value_seq_lengths=n, implementation=impl
      )
    return lambda q, k, v, n: decode_attention(q, k, v, lengths=n, implementation=name)
  if name in PEERS:
    impl = "cudnn" if name == "jax_cudnn" else "xla"
    s = shape.S or shape.T
    if mask == Mask():
      return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl
      )
    dense = _dense_mask(mask, shape.T, s)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense, implementation=impl)
  return lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation=name)


def _time(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up outside the clock
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _inputs(shape: Shape, dtype):
  s = shape.S or shape.T
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(ks[0], (shape.B, shape.T, shape.H, shape.D), dtype)
  k = jax.random.normal(ks[1], (shape.B, s, shape.K, shape.D), dtype)
  v = jax.random.normal(ks[2], (shape.B, s, shape.K, shape.D), dtype)
  if shape.kind == "decode":
    return q, k, v, jnp.full((shape.B,), s, jnp.int32)
  return q, k, v


def _peak_bytes(compiled):
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def _device_peak():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def bench_attention(
  shapes: Sequence[Shape] | None = None,
  implementations: Sequence[str] | None = None,
  dtype: str = "bfloat16",
  repeats: int = 5,
  backward: bool | None = None,
) -> list[dict]:
  """Times each implementation on each shape, forward and forward+backward.

  Args:
    shapes: :class:`Shape` list; default :func:`default_shapes` for this backend.
    implementations: ``ops.attention`` names (``xla``, ``pallas_tpu``, ``pallas_gpu``,
      ``reference``) and peers ``jax_cudnn``, ``jax_xla``; default by backend.
    dtype: dtype of q, k, v.
    repeats: timed runs after a warm-up; the median is kept.
    backward: also time forward+backward (default: yes; decode shapes are forward only).

  Returns:
    One dict per (implementation, shape, mode): ``implementation, shape, mode, time_ms,
    tflops, gbps`` (decode: K/V bytes read per second), ``peak_bytes`` (XLA's compiled
    estimate: arguments + outputs + temporaries), ``device_peak_bytes`` (the allocator's
    running peak from ``memory_stats()`` where the backend has one), and ``error`` (why a row
    could not run, e.g. cuDNN refusing a shape, or None).
  """
  shapes = list(shapes or default_shapes())
  implementations = list(implementations or default_implementations())
  dtype = jnp.dtype(dtype)
  rows = []
  for shape in shapes:
    s = shape.S or shape.T
    pairs = visible_pairs(MASKS[shape.mask], shape.T, s) if shape.kind != "decode" else s
    fwd_flops = 4 * shape.B * shape.H * shape.D * pairs
    kv_bytes = 2 * shape.B * s * shape.K * shape.D * dtype.itemsize
    modes = ["fwd"]
    if shape.kind != "decode" and backward is not False:
      modes.append("fwd+bwd")
    args = _inputs(shape, dtype)
    for name in implementations:
      for mode in modes:
        row = dict(implementation=name, shape=shape.name, mode=mode, time_ms=None, tflops=None)
        row.update(gbps=None, peak_bytes=None, device_peak_bytes=None, error=None)
        rows.append(row)
        try:
          fn = _attention_fn(name, shape)
          if mode == "fwd+bwd":
            loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32))
            fn = jax.grad(loss, argnums=(0, 1, 2))
          jitted = jax.jit(fn)
          row["peak_bytes"] = _peak_bytes(jitted.lower(*args).compile())
          seconds = _time(jitted, args, repeats)
        except Exception as e:  # a peer or kernel refusing a shape is a result, not a crash
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
          continue
        flops = fwd_flops * (3.5 if mode == "fwd+bwd" else 1.0)  # bwd ~ 2.5x fwd matmuls
        row["time_ms"] = 1e3 * seconds
        row["tflops"] = flops / seconds / 1e12
        if shape.kind == "decode":
          row["gbps"] = kv_bytes / seconds / 1e9
        row["device_peak_bytes"] = _device_peak()
  return rows


def format_table(rows: list[dict]) -> str:
  """A Markdown table of :func:`bench_attention` rows."""
  lines = [
    "| implementation | shape | mode | time (ms) | TFLOP/s | GB/s | peak MiB (compiled) |",
    "|---|---|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    if r["error"]:
      lines.append(f"| {r['implementation']} | {r['shape']} | {r['mode']} | {r['error']} ||||")
      continue
    gbps = "" if r["gbps"] is None else f"{r['gbps']:.3g}"
    mem = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
    lines.append(
      f"| {r['implementation']} | {r['shape']} | {r['mode']} | {r['time_ms']:.3f} | "
      f"{r['tflops']:.2f} | {gbps} | {mem} |"
    )
  return "\n".join(lines)


def run_cli(argv: Sequence[str]) -> list[dict]:
  """``memzoo bench attention [--impl NAME ...] [--dtype D] [--repeats N] [--fwd-only]``."""
  p = argparse.ArgumentParser(prog="memzoo bench attention")
  p.add_argument("--impl", nargs="+", default=None, help="implementations and peers to time")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--fwd-only", action="store_true")
  a = p.parse_args(list(argv))
  return bench_attention(
    implementations=a.impl, dtype=a.dtype, repeats=a.repeats, backward=not a.fwd_only
  )
