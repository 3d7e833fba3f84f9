"""Benchmark of the recurrent memory ops against softmax attention, by sequence length.

``bench_memory`` times implementations of ``ops.memory.gated_delta_rule`` (``op="gated_delta"``)
or of Titans' ``ops.memory.neural_memory`` (``op="neural"``) and causal softmax attention at
several lengths, and reports time, throughput and XLA's compiled memory estimate; the chunked
forms' cost per token stays flat while attention's grows with T.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ops.memory import gated_delta_rule, init_memory, neural_memory
from pipelines.errors import InputError

ATTENTION = "attention"


def _causal_attention():
  """``ops.attention.dot_product_attention`` (causal) if present, else plain jnp softmax."""
  try:
    from ops.attention import Mask, dot_product_attention

    return lambda q, k, v: dot_product_attention(q, k, v, mask=Mask(causal=True))
  except ImportError:

    def plain(q, k, v):
      T, K = q.shape[1], q.shape[-1]
      s = jnp.einsum("bthk,bshk->bhts", q, k) * K**-0.5
      s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
      return jnp.einsum("bhts,bshv->bthv", jax.nn.softmax(s, axis=-1), v)

    return plain


def _inputs(B, T, H, K, V, dtype, gate, delta, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (B, T, H, K), dtype)
  k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = jax.random.normal(ks[2], (B, T, H, V), dtype)
  g_shape = {"none": None, "scalar": (B, T, H), "channel": (B, T, H, K)}[gate]
  g = None if g_shape is None else -jax.nn.softplus(jax.random.normal(ks[3], g_shape) - 3.0)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))) if delta else None
  return q, k, v, g, beta


def _neural_inputs(B, T, H, K, V, dtype, hidden, seed=0):
  """Unit-norm q/k, gates in [0, 0.3] and a depth-2 (``hidden``) or depth-1 memory."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  q, k = (unit(jax.random.normal(kk, (B, T, H, K))).astype(dtype) for kk in ks[:2])
  v = jax.random.normal(ks[2], (B, T, H, V), dtype)
  gates = {
    n: 0.3 * jax.random.uniform(kk, (B, T, H))
    for n, kk in zip(("lr", "momentum", "decay"), ks[3:6])
  }
  memory = init_memory(ks[6], heads=H, key_dim=K, value_dim=V, hidden=hidden)
  return q, k, v, gates, memory


def _op(op, name, chunk_size, interpret):
  """``f(q, k, v, a, b) -> [B,T,H,V]``: (a, b) are (g, beta) or (gates, memory)."""
  if name == ATTENTION:
    attend = _causal_attention()
    return lambda q, k, v, a, b: attend(q, k, v)
  if op == "neural":
    return lambda q, k, v, gates, memory: neural_memory(
      q, k, v, **gates, memory=memory, chunk_size=chunk_size, implementation=name,
      interpret=interpret,
    )[0]  # fmt: skip
  return lambda q, k, v, g, beta: gated_delta_rule(
    q, k, v, g=g, beta=beta, chunk_size=chunk_size, implementation=name, interpret=interpret
  )[0]


def _with_backward(op, argnums):
  loss = lambda q, k, v, a, b: jnp.sum(op(q, k, v, a, b).astype(jnp.float32))
  return jax.grad(loss, argnums=argnums)


def _time(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # warm-up outside the clock
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def bench_memory(
  lengths: Sequence[int] = (1024, 2048, 4096, 8192, 16384, 32768, 65536),
  implementations: Sequence[str] = ("xla", ATTENTION),
  *,
  batch: int = 1,
  heads: int = 4,
  key_dim: int = 64,
  value_dim: int = 64,
  chunk_size: int = 64,
  dtype=jnp.float32,
  gate: str = "scalar",
  delta: bool = True,
  backward: bool = False,
  repeats: int = 3,
  max_attention_len: int = 16384,
  interpret: bool | None = None,
  op: str = "gated_delta",
  memory_hidden: int | None = 64,
) -> list[dict]:
  """Times each implementation at each length.

  Args:
    lengths: sequence lengths ``T``.
    implementations: names accepted by the op's ``implementation=`` and ``"attention"``
      (causal softmax attention, the quadratic baseline).
    batch: ``B``.
    heads: ``H``.
    key_dim: ``K`` (also attention's head dim).
    value_dim: ``V``.
    chunk_size: chunk of the chunked forms.
    dtype: dtype of q, k, v.
    gate: ``"none"``, ``"scalar"`` or ``"channel"`` log decay (gated delta rule).
    delta: delta-rule writes (``beta``) instead of additive ones (gated delta rule).
    backward: time forward+backward (gradient of the output sum w.r.t. q, k, v, and for
      the neural memory also the gates and the initial memory).
    repeats: timed runs after a warm-up; the fastest is kept.
    max_attention_len: longer attention runs are skipped (quadratic cost); the row says so.
    interpret: passed to Pallas implementations.
    op: ``"gated_delta"`` or ``"neural"`` (Titans' memory, momentum optimiser).
    memory_hidden: the neural memory's hidden width (depth 2); None: depth 1.

  Returns:
    One dict per (implementation, T): ``implementation, T, time_s, tokens_per_s,
    peak_bytes`` (XLA's compiled estimate: arguments + outputs + temporaries), ``mode``, and
    ``skipped`` (a reason, or None).
  """
  if op not in ("gated_delta", "neural"):
    raise InputError(f"unknown op {op!r}; choose 'gated_delta' or 'neural'")
  argnums = (0, 1, 2, 3, 4) if op == "neural" else (0, 1, 2)
  rows = []
  for name in implementations:
    for T in lengths:
      row = dict(implementation=name, T=T, mode="fwd+bwd" if backward else "fwd", skipped=None)
      row.update(time_s=None, tokens_per_s=None, peak_bytes=None)
      if name == ATTENTION and T > max_attention_len:
        row["skipped"] = f"T > max_attention_len={max_attention_len}"
        rows.append(row)
        continue
      if op == "neural":
        args = _neural_inputs(batch, T, heads, key_dim, value_dim, dtype, memory_hidden)
      else:
        args = _inputs(batch, T, heads, key_dim, value_dim, dtype, gate, delta)
      f = _op(op, name, chunk_size, interpret)
      fn = jax.jit(_with_backward(f, argnums) if backward else f)
      stats = fn.lower(*args).compile().memory_analysis()
      if stats is not None:
        row["peak_bytes"] = int(
          stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
        )
      row["time_s"] = _time(fn, args, repeats)
      row["tokens_per_s"] = batch * T / row["time_s"]
      rows.append(row)
  return rows


def format_table(rows: list[dict]) -> str:
  """A markdown table of ``bench_memory`` rows; ``us/token`` is flat for linear-cost ops."""
  lines = [
    "| implementation | mode | T | time (ms) | tokens/s | us/token | peak memory (MiB) |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    if r["skipped"]:
      lines.append(
        f"| {r['implementation']} | {r['mode']} | {r['T']} | skipped: {r['skipped']} |||"
      )
      continue
    mem = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
    us_per_token = 1e6 * r["time_s"] / r["T"]
    lines.append(
      f"| {r['implementation']} | {r['mode']} | {r['T']} | {1e3 * r['time_s']:.2f} | "
      f"{r['tokens_per_s']:,.0f} | {us_per_token:.2f} | {mem} |"
    )
  return "\n".join(lines)


def run_cli(argv: Sequence[str]) -> list[dict]:
  """``memzoo bench memory [--op gated_delta|neural] [--impl NAME ...] [--lengths T ...]``."""
  p = argparse.ArgumentParser(prog="memzoo bench memory")
  p.add_argument("--op", choices=("gated_delta", "neural"), default="gated_delta")
  p.add_argument("--impl", nargs="+", default=["xla", ATTENTION])
  p.add_argument("--lengths", nargs="+", type=int, default=None)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--dim", type=int, default=64, help="key and value width")
  p.add_argument("--hidden", type=int, default=64, help="neural memory hidden width; 0: depth 1")
  p.add_argument("--chunk", type=int, default=None)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--backward", action="store_true")
  a = p.parse_args(list(argv))
  kw = {} if a.lengths is None else {"lengths": tuple(a.lengths)}
  return bench_memory(
    implementations=a.impl, heads=a.heads, key_dim=a.dim, value_dim=a.dim,
    chunk_size=a.chunk or (16 if a.op == "neural" else 64), dtype=jnp.dtype(a.dtype),
    backward=a.backward, repeats=a.repeats, op=a.op, memory_hidden=a.hidden or None, **kw,
  )  # fmt: skip
