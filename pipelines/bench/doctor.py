"""``memzoo doctor``: compile, check and time every kernel on the present backend; one table.

Each check runs an op's implementations forward and backward (gradients of ``sum(o * ct)``
with respect to every float input) against ``reference`` and compares them with the tolerance
table (max abs error over ``max(1, max |reference|)``), then times forward+backward. Attention
is also timed against ``jax.nn.dot_product_attention`` (cuDNN, on GPU only) at the same shape.

On an accelerator the shapes are realistic (bf16 attention and gated delta at T = 4096) and
the Pallas kernel is the platform's. On CPU it is a small interpret-mode subset: both
platforms' Pallas kernels in the Pallas interpreter at tiny shapes, so its times say nothing
about speed; the columns of throughput are then left empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ops.attention as attention
import ops.memory as memory
from ops.attention import Mask
from ops.common import NotSupportedError
from pipelines.bench.attention import visible_pairs
from pipelines.errors import InputError
from pipelines.report import markdown_table

# Max abs error over max(1, max |reference|), by (op, dtype) for outputs and gradients. bf16:
# the inputs are the same bf16 values on both sides and the error is the kernel's bf16
# rounding of the outputs (8 mantissa bits: 2**-8 ~ 4e-3 of the largest element) plus bf16
# operands into the dots. f32: different summation orders only.
TOLERANCES = {
  ("attention", "float32"): {"out": 1e-5, "grad": 1e-4},
  ("attention", "bfloat16"): {"out": 2e-2, "grad": 4e-2},
  ("decode", "float32"): {"out": 1e-5, "grad": None},
  ("decode", "bfloat16"): {"out": 2e-2, "grad": None},
  ("gated_delta", "float32"): {"out": 1e-4, "grad": 5e-4},
  ("gated_delta", "bfloat16"): {"out": 3e-2, "grad": 5e-2},
  # The neural memory computes in f32 whatever the input (errors compound over chunks).
  ("neural_memory", "float32"): {"out": 1e-4, "grad": 1e-3},
}

# Dense bf16 peak FLOP/s and HBM bandwidth by device kind (public spec sheets).
PEAKS = {
  "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),
  "NVIDIA H200": (989e12, 4.8e12),
  "NVIDIA A100-SXM4-80GB": (312e12, 2.0e12),
  "TPU v5 lite": (197e12, 0.82e12),
  "TPU v6 lite": (918e12, 1.64e12),
  "TPU v5p": (459e12, 2.76e12),
  "TPU v4": (275e12, 1.2e12),
}


@dataclasses.dataclass(frozen=True)
class Check:
  """One op at one shape: ``run(implementation)`` returns the differentiable outputs.

  Attributes:
    name: what is checked, e.g. ``"attention causal"``.
    op: key of ``TOLERANCES``.
    dtype: input dtype name.
    shape: a short description.
    args: float inputs (differentiated).
    run: ``(implementation, *args) -> output array``.
    implementations: names to run (the first is compared with, and is never timed twice).
    flops: forward FLOPs (backward counted as 2x forward).
    bytes: bytes the forward must move at least (inputs and outputs once).
  """

  name: str
  op: str
  dtype: str
  shape: str
  args: tuple
  run: Callable[..., jax.Array]
  implementations: tuple[str, ...]
  flops: float
  bytes: float


def _rand(key, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _attention_checks(backend: str, small: bool, pallas: tuple[str, ...]) -> list[Check]:
  b, t, h, kh, d = (1, 64, 2, 1, 32) if small else (2, 4096, 16, 8, 128)
  dtype = jnp.float32 if small else jnp.bfloat16
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (
    _rand(keys[0], (b, t, h, d), dtype),
    *(_rand(kk, (b, t, kh, d), dtype) for kk in keys[1:3]),
  )
  half = t // 2
  segments = jnp.asarray(np.repeat([[0] * (half - 3) + [1] * (t - half + 3)], b, 0), jnp.int32)
  bs = 16 if small else 128
  nq = t // bs
  # Block-sparse: each query block sees itself and block 0 (landmark/InfLLM retrieval shape).
  blocks = np.stack([np.zeros(nq), np.arange(nq)], -1).astype(np.int32)
  blocks = jnp.asarray(np.broadcast_to(blocks, (b, kh, nq, 2)))
  window = 16 if small else 1024
  kinds = {
    "causal": dict(mask=Mask()),
    "full": dict(mask=None),
    "sink+window": dict(mask=Mask(window=window, sinks=4)),
    "prefix": dict(mask=Mask(prefix=half)),
    "packed": dict(mask=Mask(), segment_ids=(segments, segments)),
    "block-sparse": dict(mask=Mask(), block_indices=blocks, block_size=(bs, bs)),
  }
  if small:  # the CPU subset: the kinds that take different kernel paths
    kinds = {n: kinds[n] for n in ("causal", "sink+window", "packed", "block-sparse")}
  peers = ("cudnn",) if backend == "gpu" else ()
  checks = []
  for i, (kind, kw) in enumerate(kinds.items()):
    mask = kw.get("mask")
    pairs = visible_pairs(mask, t, t)
    if "block_indices" in kw:
      pairs = min(pairs, nq * 2 * bs * bs)

    def run(impl, q, k, v, kw=kw):
      if impl == "cudnn":
        return _cudnn(q, k, v, kw)
      return attention.dot_product_attention(q, k, v, implementation=impl, **kw)

    impls = ("reference", _pick(pallas, i), "xla")
    if kind in ("causal", "full"):
      impls += peers
    checks.append(
      Check(
        f"attention {kind}",
        "attention",
        jnp.dtype(dtype).name,
        f"B{b} T{t} H{h}/{kh} D{d}",
        (q, k, v),
        run,
        impls,
        4.0 * b * h * d * pairs,
        float(sum(x.nbytes for x in (q, k, v, q))),
      )
    )
  # Decode: a few queries against a long cache (plain JAX split-K; no kernel yet).
  s = t * (1 if small else 8)
  kc, vc = (_rand(kk, (b, s, kh, d), dtype) for kk in jax.random.split(keys[3]))
  qd = q[:, :1]
  lengths = jnp.full((b,), s - 5, jnp.int32)
  checks.append(
    Check(
      "decode",
      "decode",
      jnp.dtype(dtype).name,
      f"B{b} S{s} H{h}/{kh} D{d}",
      (qd, kc, vc),
      lambda impl, q, k, v: attention.decode_attention(
        q, k, v, lengths=lengths, implementation=impl
      ),
      ("reference", "xla"),
      4.0 * b * h * d * (s - 5),
      float(kc.nbytes + vc.nbytes),
    )
  )
  return checks


def _pick(pallas: tuple[str, ...], i: int) -> str:
  """The kernel a check runs: the platform's, or on CPU the two platforms' in turn (interpret
  mode is slow; each kernel path is still run by some check)."""
  return pallas[i % len(pallas)]


def _cudnn(q, k, v, kw):
  mask = kw.get("mask")
  return jax.nn.dot_product_attention(
    q, k, v, is_causal=mask is not None and mask.causal, implementation="cudnn"
  )


def _gated_delta_checks(small: bool, pallas: tuple[str, ...]) -> list[Check]:
  b, t, h, kd, vd, c = (1, 64, 2, 16, 16, 16) if small else (2, 4096, 16, 128, 128, 64)
  dtype = jnp.float32 if small else jnp.bfloat16
  keys = jax.random.split(jax.random.PRNGKey(1), 5)
  q = _rand(keys[0], (b, t, h, kd), dtype)
  k = jax.random.normal(keys[1], (b, t, h, kd))
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = _rand(keys[2], (b, t, h, vd), dtype)
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (b, t, h)) + 3.0)
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (b, t, h)))
  segments = jnp.asarray(np.repeat([[0] * (t // 3) + [1] * (t - t // 3)], b, 0), jnp.int32)
  checks = []
  for i, (kind, seg) in enumerate((("gated DeltaNet", None), ("gated DeltaNet packed", segments))):

    def run(impl, q, k, v, g, beta, seg=seg):
      o, _ = memory.gated_delta_rule(
        q, k, v, g=g, beta=beta, chunk_size=c, segment_ids=seg, implementation=impl
      )
      return o

    checks.append(
      Check(
        kind,
        "gated_delta",
        jnp.dtype(dtype).name,
        f"B{b} T{t} H{h} K{kd} V{vd} C{c}",
        (q, k, v, g, beta),
        run,
        ("reference", _pick(pallas, i + 1), "xla"),
        b * t * h * (c * (6 * kd + 4 * vd) + 6 * kd * vd),
        float(sum(x.nbytes for x in (q, k, v, v))),
      )
    )
  return checks


def _neural_memory_checks(small: bool, pallas: tuple[str, ...]) -> list[Check]:
  b, t, h, kd, c = (1, 32, 2, 16, 16) if small else (2, 2048, 8, 64, 16)
  keys = jax.random.split(jax.random.PRNGKey(2), 7)
  q, k, v = (_rand(keys[i], (b, t, h, kd), jnp.float32, 0.5) for i in range(3))
  gate = lambda kk: 0.5 * jax.nn.sigmoid(jax.random.normal(kk, (b, t, h)))
  lr, mom, decay = gate(keys[3]), gate(keys[4]), gate(keys[5])
  weights = memory.init_memory(keys[6], heads=h, key_dim=kd, value_dim=kd, hidden=2 * kd)

  def run(impl, q, k, v, lr, mom, decay):
    y, _ = memory.neural_memory(
      q, k, v, lr=lr, momentum=mom, decay=decay, memory=weights, chunk_size=c, implementation=impl
    )
    return y

  mn = 2 * kd * 2 * kd  # two [K, 2K] / [2K, K] weight matrices
  return [
    Check(
      "neural memory (depth 2)",
      "neural_memory",
      "float32",
      f"B{b} T{t} H{h} K{kd} Dh{2 * kd} C{c}",
      (q, k, v, lr, mom, decay),
      run,
      ("reference", _pick(pallas, 1), "xla"),
      b * t * h * (8 * mn + 2 * c * 6 * kd),
      float(sum(x.nbytes for x in (q, k, v, v))),
    )
  ]


def _forward_backward(check: Check, impl: str, backward: bool):
  """One jitted function: the output and (with ``backward``) the gradients of
  ``sum(o * cos(index))`` with respect to every input."""

  def both(*args):
    o, vjp = jax.vjp(lambda *a: check.run(impl, *a), *args)
    if not backward:
      return o, ()
    ct = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape)).astype(o.dtype)
    return o, vjp(ct)

  return jax.jit(both)


def _error(x, ref) -> float:
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def run_checks(
  checks: list[Check], *, timed: bool, repeats: int = 3, progress: bool = False
) -> list[dict[str, Any]]:
  """Runs every implementation of every check; returns one row per (check, implementation)."""
  peak_flops, peak_bw = PEAKS.get(jax.devices()[0].device_kind, (None, None))
  rows = []
  for check in checks:
    tol = TOLERANCES[(check.op, check.dtype)]
    ref_out = ref_grads = None
    for impl in check.implementations:
      row = {"check": check.name, "impl": impl, "dtype": check.dtype, "shape": check.shape}
      try:
        step = _forward_backward(check, impl, tol["grad"] is not None)
        out, grads = step(*check.args)
        if impl == "reference":
          ref_out, ref_grads = out, grads
          row.update(status="reference")
        else:
          err_out = _error(out, ref_out)
          err_grad = max((_error(a, r) for a, r in zip(grads, ref_grads)), default=0.0)
          ok = err_out <= tol["out"] and (tol["grad"] is None or err_grad <= tol["grad"])
          row.update(
            status="pass" if ok else "FAIL",
            err_out=err_out,
            err_grad=err_grad if tol["grad"] is not None else "",
            tol=f"{tol['out']:g}/{tol['grad']:g}" if tol["grad"] is not None else f"{tol['out']:g}",
          )
        if timed and impl != "reference":
          seconds = _time(step, check.args, repeats)
          flops = check.flops * (3.0 if tol["grad"] is not None else 1.0)
          nbytes = check.bytes * (3.0 if tol["grad"] is not None else 1.0)
          row.update(ms=1e3 * seconds, tflops=flops / seconds / 1e12, gbs=nbytes / seconds / 1e9)
          if peak_flops:
            row["peak"] = max(flops / seconds / peak_flops, nbytes / seconds / peak_bw)
      except NotSupportedError as e:  # a limit the implementation declares, not a failure
        row.update(status="refused", error=str(e).strip().splitlines()[-1][:160])
      except Exception as e:  # noqa: BLE001 - every failure is a row of the table
        row.update(status="FAIL", error=f"{type(e).__name__}: {str(e).strip()[:160]}")
      rows.append(row)
      if progress:
        print(f"  {row['check']:28s} {impl:12s} {row['status']}", file=sys.stderr, flush=True)
  return rows


def checks_for(backend: str) -> list[Check]:
  """The checks of a backend: the platform's kernel at realistic shapes, or the CPU subset."""
  small = backend == "cpu"
  pallas = ("pallas_gpu", "pallas_tpu") if small else (f"pallas_{backend}",)
  return (
    _attention_checks(backend, small, pallas)
    + _gated_delta_checks(small, pallas)
    + _neural_memory_checks(small, pallas)
  )


def run(
  backend: str | None = None, *, only: str | None = None, progress: bool = False
) -> list[dict[str, Any]]:
  """Builds and runs the checks of ``backend`` (default: the present one).

  Args:
    backend: ``"cpu"``, ``"gpu"`` or ``"tpu"``.
    only: keep the checks whose name contains this string.
  """
  backend = backend or (
    "gpu" if jax.default_backend() in ("cuda", "rocm") else jax.default_backend()
  )
  checks = checks_for(backend)
  if only:
    checks = [c for c in checks if only in c.name]
    if not checks:
      raise InputError(f"no doctor check matches {only!r}")
  return run_checks(checks, timed=backend != "cpu", progress=progress)


COLUMNS = ("check", "impl", "dtype", "shape", "status", "err_out", "err_grad", "tol", "ms",
           "tflops", "gbs", "peak", "error")  # fmt: skip


def format_table(rows: list[dict[str, Any]]) -> str:
  """Markdown table; empty columns are dropped."""
  cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
  return markdown_table(rows, cols)


def main(argv: list[str]) -> int:
  """``memzoo doctor [--only NAME] [--out FILE]``; exit status 1 if any check fails."""
  p = argparse.ArgumentParser(prog="memzoo doctor", description=__doc__.split("\n")[0])
  p.add_argument("--only", default=None, help="run the checks whose name contains this")
  p.add_argument("--out", default=None, help="also write the markdown table to this file")
  a = p.parse_args(argv)
  device = jax.devices()[0]
  t0 = time.perf_counter()
  rows = run(only=a.only, progress=True)
  header = (
    f"memzoo doctor on {device.platform} ({device.device_kind}), jax {jax.__version__}, "
    f"{time.perf_counter() - t0:.0f} s\n\n"
  )
  table = header + format_table(rows)
  print(table)
  if a.out:
    with open(a.out, "w") as f:
      f.write(table + "\n")
  return 1 if any(r["status"] == "FAIL" for r in rows) else 0
