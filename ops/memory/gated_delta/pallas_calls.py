"""``pallas_call`` wrappers for the gated delta rule kernels (TPU Mosaic and GPU Triton).

Every array is head-major ``[B,H,T,*]`` (a chunk is one ``[C,*]`` tile) or per-chunk
``[B,H,N,*,*]`` (decay rows ``[1,C]``, states ``[K,V]``, per-channel ``P [C,C]`` and the
chunk's total decay as a ``[K,1]`` column). Operands are passed as ``(name, array, layout,
dim)`` and the kernel bodies look them up by name, since which ones exist depends on the mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from ops.memory.gated_delta import pallas_kernels as kern

f32 = jnp.float32
_SQ = pl.squeezed


@dataclasses.dataclass(frozen=True)
class Config:
  """Static arguments of the kernels.

  Attributes:
    platform: ``"tpu"`` (Mosaic) or ``"gpu"`` (Triton).
    scale: output scale.
    chunk: chunk size ``C``.
    delta: delta rule (``beta`` given) rather than additive write.
    block_v: ``BV``, the value-dim block of the sequential kernels (state tile ``[K,BV]``).
    interpret: run the kernels in the Pallas interpreter (TPU: NaN-filled fresh buffers).
    channel: per-key-channel decay ``g [B,T,H,K]`` rather than one per head.
    segments: packed segments; the kernels take the reset counts ``rcol``/``rrow``.
    operands: dtype name of every dot operand in the kernels (accumulation is float32).
  """

  platform: str
  scale: float
  chunk: int
  delta: bool
  block_v: int
  interpret: bool
  channel: bool = False
  segments: bool = False
  operands: str = "float32"


def _interpret(cfg: Config):
  if not cfg.interpret:
    return False
  if cfg.platform == "tpu":
    # Fresh outputs and scratch start as NaN, so any element a kernel forgets to write fails.
    return pltpu.InterpretParams(uninitialized_memory="nan")
  return True


def _run(kernel, cfg, grid, semantics, ins, outs, spec, scratch=None):
  """Calls ``kernel`` with named operands; returns ``{name: output}``.

  Args:
    kernel: body taking ``*refs, names``.
    cfg: the static config.
    grid: the grid.
    semantics: TPU dimension semantics, one per grid axis.
    ins: ``(name, array, layout, dim)`` per input.
    outs: ``(name, jax.ShapeDtypeStruct, layout, dim)`` per output.
    spec: ``(layout, dim) -> BlockSpec`` for this grid.
    scratch: ``None`` or one TPU scratch buffer, named ``"scratch"``.
  """
  names = [x[0] for x in ins] + [x[0] for x in outs] + ([] if scratch is None else ["scratch"])
  if cfg.platform == "tpu":
    params = pltpu.CompilerParams(dimension_semantics=semantics)
  else:
    params = plgpu.CompilerParams(num_warps=4, num_stages=2)
  results = pl.pallas_call(
    functools.partial(kernel, names=tuple(names), operands=cfg.operands),
    grid=grid,
    in_specs=[spec(layout, dim) for _, _, layout, dim in ins],
    out_specs=[spec(layout, dim) for _, _, layout, dim in outs],
    out_shape=[shape for _, shape, _, _ in outs],
    scratch_shapes=[] if scratch is None else [scratch],
    compiler_params=params,
    interpret=_interpret(cfg),
  )(*[x[1] for x in ins])
  return {name: x for (name, *_), x in zip(outs, results, strict=True)}


def _parallel_spec(cfg, layout, dim):
  """Grid ``(B,H,N,V/BV)``.

  Layouts: ``"seq"`` a ``[C,dim]`` tile of ``[B,H,T,dim]``; ``"seq_v"`` its ``[C,BV]`` value
  block; ``"chunked"`` the ``dim = (d1,d2)`` block of chunk n of ``[B,H,N,d1,d2]``;
  ``"states"`` the ``[dim,BV]`` block of a per-chunk state; ``"partial"`` / ``"partial_chunked"``
  the value block's own slice of a ``[V/BV,B,H,T,dim]`` / ``[V/BV,B,H,N,d1,d2]`` output of
  partial sums over the value dim (the caller adds them up).
  """
  C, BV = cfg.chunk, cfg.block_v
  block, index = {
    "seq": lambda: ((_SQ, _SQ, C, dim), lambda b, h, n, j: (b, h, n, 0)),
    "seq_v": lambda: ((_SQ, _SQ, C, BV), lambda b, h, n, j: (b, h, n, j)),
    "chunked": lambda: ((_SQ, _SQ, _SQ, *dim), lambda b, h, n, j: (b, h, n, 0, 0)),
    "states": lambda: ((_SQ, _SQ, _SQ, dim, BV), lambda b, h, n, j: (b, h, n, 0, j)),
    "partial": lambda: ((_SQ, _SQ, _SQ, C, dim), lambda b, h, n, j: (j, b, h, n, 0)),
    "partial_chunked": lambda: (
      (_SQ, _SQ, _SQ, _SQ, *dim),
      lambda b, h, n, j: (j, b, h, n, 0, 0),
    ),
  }[layout]()
  return pl.BlockSpec(block, index)


def _sequential_spec(cfg, T, reverse, layout, dim):
  """Specs for the sequential kernels.

  Layouts: ``"seq"`` a ``[B,H,T,dim]`` array; ``"seq_v"`` a ``[B,H,T,V]`` array blocked by
  ``BV``; ``"chunked"`` a ``[B,H,N,d1,d2]`` array with ``dim = (d1,d2)``; ``"states"``
  ``[B,H,N,dim,V]`` per-chunk states blocked by ``BV``; ``"state"`` one ``[B,H,dim,V]`` state
  blocked by ``BV``. TPU: grid ``(B,H,V/BV,N)`` and a block is one chunk. GPU: grid
  ``(B,H,V/BV)`` and a block is the whole sequence, which the kernel walks with ``pl.ds``.
  """
  C, BV = cfg.chunk, cfg.block_v
  N = T // C
  tpu = cfg.platform == "tpu"
  rows, chunks = (C, _SQ) if tpu else (T, N)
  block, index = {
    "seq": lambda: ((_SQ, _SQ, rows, dim), lambda n, j: (n, 0)),
    "seq_v": lambda: ((_SQ, _SQ, rows, BV), lambda n, j: (n, j)),
    "chunked": lambda: ((_SQ, _SQ, chunks, *dim), lambda n, j: (n, 0, 0)),
    "states": lambda: ((_SQ, _SQ, chunks, dim, BV), lambda n, j: (n, 0, j)),
    "state": lambda: ((_SQ, _SQ, dim, BV), lambda n, j: (0, j)),
  }[layout]()
  if tpu:
    chunk_of = (lambda n: N - 1 - n) if reverse else (lambda n: n)
    return pl.BlockSpec(block, lambda b, h, j, n: (b, h, *index(chunk_of(n), j)))
  return pl.BlockSpec(block, lambda b, h, j: (b, h, *index(0, j)))


def _sequential(cfg, B, H, T, V, reverse):
  """``(grid, semantics, spec)`` of a sequential kernel."""
  nv = V // cfg.block_v
  spec = functools.partial(_sequential_spec, cfg, T, reverse)
  if cfg.platform == "tpu":
    return (B, H, nv, T // cfg.chunk), ("parallel", "parallel", "parallel", "arbitrary"), spec
  return (B, H, nv), ("parallel",) * 3, spec


def _decay_operands(cfg, g, grow, p, glast, *, sequential, seg=None):
  """The decay operands: ``G`` tiles, plus those given of its rows (scalar decay), ``P`` and
  (per channel, sequential kernels) each chunk's total decay as a column; with segments the
  reset counts ``seg = (rcol [B,H,T,1], rrow [B,H,N,1,C])`` (the row only where ``Dm`` is
  built in-kernel, i.e. with ``grow``)."""
  K = g.shape[-1]
  ops = [("g", g, "seq", K)]
  C = cfg.chunk
  if grow is not None:
    ops.append(("grow", grow, "chunked", (1, C)))
  if p is not None:
    ops.append(("p", p, "chunked", (C, C)))
  if cfg.channel and sequential:
    ops.append(("glast", glast, "chunked", (glast.shape[-2], 1)))
  if cfg.segments:
    rcol, rrow = seg
    ops.append(("rcol", rcol, "seq", 1))
    if grow is not None:
      ops.append(("rrow", rrow, "chunked", (1, C)))
  return ops


def wy(cfg, k, v, bcol, brow, gcol, grow, seg=None):
  """Parallel, scalar decay: ``(W [B,H,T,K], U [B,H,T,V])`` float32."""
  B, H, T, K = k.shape
  V, C = v.shape[-1], cfg.chunk
  ins = [("k", k, "seq", K), ("v", v, "seq", V), ("bcol", bcol, "seq", 1)]
  ins += [("brow", brow, "chunked", (1, C))]
  ins += _decay_operands(cfg, gcol, grow, None, None, sequential=False, seg=seg)
  outs = [
    ("w", jax.ShapeDtypeStruct((B, H, T, K), f32), "seq", K),
    ("u", jax.ShapeDtypeStruct((B, H, T, V), f32), "seq", V),
  ]
  spec = functools.partial(_parallel_spec, cfg)
  r = _run(kern.wy_kernel, cfg, (B, H, T // C, 1), ("parallel",) * 4, ins, outs, spec)
  return r["w"], r["u"]


def state_fwd(cfg, k, w, u, g, glast, h0, seg=None):
  """Sequential: ``(hs [B,H,N,K,V] entering states, vn [B,H,T,V] or None, ht [B,H,K,V])``."""
  B, H, T, K = k.shape
  V = u.shape[-1]
  N = T // cfg.chunk
  grid, semantics, spec = _sequential(cfg, B, H, T, V, reverse=False)
  ins = [("k", k, "seq", K)] + ([("w", w, "seq", K)] if cfg.delta else [])
  ins += [("u", u, "seq_v", V)]
  ins += _decay_operands(cfg, g, None, None, glast, sequential=True, seg=seg)
  ins += [("h0", h0, "state", K)]
  outs = [("hs", jax.ShapeDtypeStruct((B, H, N, K, V), f32), "states", K)]
  if cfg.delta:
    outs.append(("vn", jax.ShapeDtypeStruct((B, H, T, V), f32), "seq_v", V))
  outs.append(("ht", jax.ShapeDtypeStruct((B, H, K, V), f32), "state", K))
  if cfg.platform == "tpu":
    kernel = functools.partial(kern.state_fwd_kernel_tpu, num_chunks=N)
    scratch = pltpu.VMEM((K, cfg.block_v), f32)
  else:
    kernel = functools.partial(kern.state_fwd_kernel_gpu, num_chunks=N, chunk=cfg.chunk)
    scratch = None
  r = _run(kernel, cfg, grid, semantics, ins, outs, spec, scratch)
  return r["hs"], r.get("vn"), r["ht"]


def state_bwd(cfg, q, k, w, do, g, grow, p, glast, dht, seg=None):
  """Sequential, reversed: ``(dhs [B,H,N,K,V] leaving-state grads, dvn [B,H,T,V], dh0)``."""
  B, H, T, K = q.shape
  V = do.shape[-1]
  N = T // cfg.chunk
  grid, semantics, spec = _sequential(cfg, B, H, T, V, reverse=True)
  ins = [("q", q, "seq", K), ("k", k, "seq", K)] + ([("w", w, "seq", K)] if cfg.delta else [])
  ins += [("do", do, "seq_v", V)]
  ins += _decay_operands(cfg, g, grow, p, glast, sequential=True, seg=seg)
  ins += [("dht", dht, "state", K)]
  outs = [
    ("dhs", jax.ShapeDtypeStruct((B, H, N, K, V), f32), "states", K),
    ("dvn", jax.ShapeDtypeStruct((B, H, T, V), f32), "seq_v", V),
    ("dh0", jax.ShapeDtypeStruct((B, H, K, V), f32), "state", K),
  ]
  if cfg.platform == "tpu":
    kernel = functools.partial(kern.state_bwd_kernel_tpu, num_chunks=N, scale=cfg.scale)
    scratch = pltpu.VMEM((K, cfg.block_v), f32)
  else:
    kernel = functools.partial(
      kern.state_bwd_kernel_gpu, num_chunks=N, chunk=cfg.chunk, scale=cfg.scale
    )
    scratch = None
  r = _run(kernel, cfg, grid, semantics, ins, outs, spec, scratch)
  return r["dhs"], r["dvn"], r["dh0"]


def output(cfg, q, k, vn, g, grow, p, hs, dtype, seg=None):
  """Parallel over chunks and value blocks: ``o [B,H,T,V]`` in ``dtype``."""
  B, H, T, K = q.shape
  V = vn.shape[-1]
  ins = [("q", q, "seq", K), ("k", k, "seq", K), ("vn", vn, "seq_v", V)]
  ins += _decay_operands(cfg, g, grow, p, None, sequential=False, seg=seg)
  ins += [("h", hs, "states", K)]
  outs = [("o", jax.ShapeDtypeStruct((B, H, T, V), dtype), "seq_v", V)]
  spec = functools.partial(_parallel_spec, cfg)
  kernel = functools.partial(kern.output_kernel, scale=cfg.scale)
  grid = (B, H, T // cfg.chunk, V // cfg.block_v)
  return _run(kernel, cfg, grid, ("parallel",) * 4, ins, outs, spec)["o"]


def grads(cfg, q, k, vn, do, dvn, g, grow, hs, dhs, seg=None):
  """Parallel per-chunk gradients: ``{dq, dk, dw (delta), dg, p_out (per channel)}`` float32.

  ``dg`` is ``[B,H,T,1]`` (scalar decay) or ``[B,H,T,K]``; ``p_out [B,H,N,C,C]`` is the
  gradient of the per-channel ``P``. Each program sees one value block (``[K,BV]`` state
  tiles); every output is a sum over the value dim, so the programs write partial sums that
  are added here.
  """
  B, H, T, K = q.shape
  V, C = vn.shape[-1], cfg.chunk
  nv = V // cfg.block_v
  ins = [("q", q, "seq", K), ("k", k, "seq", K), ("vn", vn, "seq_v", V), ("do", do, "seq_v", V)]
  ins += [("dvn", dvn, "seq_v", V)] if cfg.delta else []
  ins += _decay_operands(cfg, g, grow, None, None, sequential=False, seg=seg)
  ins += [("h", hs, "states", K), ("dh", dhs, "states", K)]
  per_token = lambda D: jax.ShapeDtypeStruct((nv, B, H, T, D), f32)
  outs = [("dq", per_token(K), "partial", K), ("dk", per_token(K), "partial", K)]
  outs += [("dw", per_token(K), "partial", K)] if cfg.delta else []
  outs += [("dg", per_token(g.shape[-1]), "partial", g.shape[-1])]
  if cfg.channel:
    p_shape = jax.ShapeDtypeStruct((nv, B, H, T // C, C, C), f32)
    outs.append(("p_out", p_shape, "partial_chunked", (C, C)))
  spec = functools.partial(_parallel_spec, cfg)
  kernel = functools.partial(kern.grad_kernel, scale=cfg.scale)
  r = _run(kernel, cfg, (B, H, T // C, nv), ("parallel",) * 4, ins, outs, spec)
  return {name: x[0] if nv == 1 else jnp.sum(x, axis=0) for name, x in r.items()}
