"""Kernel bodies of the Pallas neural memory forward, shared by Mosaic TPU and Triton GPU.

One grid point owns one (batch, head) and walks its chunks in order, carrying the memory
weights ``M`` and momentum ``U`` (one ``[m,n]`` matrix per weight: ``w``, or ``w1``/``w2``).
Per chunk, with ``M0`` the weights the chunk's gradients are taken at (``M`` itself except for
a first chunk entered mid-way, whose ``M0`` is an input) and the gate coefficients precomputed
in XLA (``pallas_common._coefficients``; ``coef [C,C]`` and the columns of ``vecs [C,8]``)::

  gradient factors at M0:  depth 1: left = k, right = e = 2 (k W0 - v)
                           depth 2: h = k W1_0, z = act(h), e = 2 (z W2_0 - v),
                                    d = act'(h) * (e W2_0^T); w1: (k, d), w2: (z, e)
  read of one layer:       x W_i = a_i (x M) + b_i (x U) - ((coef * x left^T) right)_i
  chunk end:               M' = a_C M + b_C U - left^T (c_C * right)
                           U' = E_C U - left^T (m * right)

(README.md derives them; ``+ x`` on the read and ``+ k`` in ``e`` with ``residual``.) The
chunk math is ``_chunk_step`` on loaded values; the bodies only load, call it and store. On
TPU the chunk axis is an ``arbitrary`` grid axis with ``M``, ``U``, ``M0`` in VMEM scratch; on
GPU every grid point is an independent program, so one program loops over the chunks with the
weights in HBM, read and written in tiles of hidden units (``forward_kernel_gpu``) so that no
program holds a whole weight matrix. Masks and column picks are iota comparisons and
reductions, never dynamic indexing of values, which neither Mosaic nor Triton can do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

f32 = jnp.float32
# Full float32 matmuls: Triton's default is TF32 and Mosaic's may be bf16 passes, and errors in
# the weights compound over every later chunk.
_HIGHEST = jax.lax.Precision.HIGHEST

# Columns of ``vecs``: the read's coefficients of M and U, the cumulative momentum product
# (its last row scales U at the chunk end), the last row of ``coef`` and the momentum's
# gradient coefficients at the chunk end. The rest is zero padding to a power of two.
A_COL, B_COL, ETA_COL, LAST_COL, MOM_COL = range(5)
NUM_VECS = 8
DEPTH_NAMES = {1: ("w",), 2: ("w1", "w2")}


def _dot(a, b):
  """``a [M,K] @ b [K,N]``."""
  return jax.lax.dot_general(
    a, b, (((1,), (0,)), ((), ())), precision=_HIGHEST, preferred_element_type=f32
  )


def _dot_nt(a, b):
  """``a [M,K] @ b [N,K]^T``."""
  return jax.lax.dot_general(
    a, b, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=f32
  )


def _dot_tn(a, b):
  """``a [K,M]^T @ b [K,N]``."""
  return jax.lax.dot_general(
    a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST, preferred_element_type=f32
  )


def _column(vecs, j):
  """Column ``j`` of ``vecs [C,8]`` as ``[C,1]``."""
  lane = jax.lax.broadcasted_iota(jnp.int32, vecs.shape, 1)
  return jnp.sum(jnp.where(lane == j, vecs, 0.0), axis=1, keepdims=True)


def _last(col):
  """The last row of ``col [C,1]`` as ``[1,1]``."""
  row = jax.lax.broadcasted_iota(jnp.int32, col.shape, 0)
  return jnp.sum(jnp.where(row == col.shape[0] - 1, col, 0.0), axis=0, keepdims=True)


def _sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


def activation_and_derivative(name, h):
  """``(act(h), act'(h))`` in closed form (``common.ACTIVATIONS``; gelu is the tanh form)."""
  if name == "silu":
    s = _sigmoid(h)
    return h * s, s * (1.0 + h * (1.0 - s))
  if name == "relu":
    return jnp.maximum(h, 0.0), jnp.where(h > 0.0, 1.0, 0.0)
  if name == "tanh":
    t = jnp.tanh(h)
    return t, 1.0 - t * t
  if name == "gelu":
    c = 0.7978845608028654  # sqrt(2 / pi)
    t = jnp.tanh(c * (h + 0.044715 * h * h * h))
    return 0.5 * h * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * c * (
      1.0 + 3 * 0.044715 * h * h
    )
  raise ValueError(f"unknown activation {name!r}")


def _chunk_step(weights, momentum, m0, q, k, v, coef, vecs, *, activation, residual):
  """One chunk of one (batch, head).

  Args:
    weights, momentum, m0: ``{name: [m,n]}`` float32: ``M``, ``U`` at the chunk start and the
      weights the gradients are taken at.
    q, k: ``[C,F]`` feature-mapped queries and keys.
    v: ``[C,V]``.
    coef: ``[C,C]`` read coefficients of the rank-1 gradient terms.
    vecs: ``[C,8]`` the per-token coefficient columns (``A_COL`` ...).
    activation: the depth-2 nonlinearity.
    residual: read ``x + M(x)``.

  Returns:
    ``(y [C,V], weights', momentum')``.
  """
  a, b = _column(vecs, A_COL), _column(vecs, B_COL)
  if len(weights) == 1:
    err = _dot(k, m0["w"]) - v
    factors = {"w": (k, 2.0 * (err + k if residual else err))}
  else:
    z, dz = activation_and_derivative(activation, _dot(k, m0["w1"]))
    err = _dot(z, m0["w2"]) - v
    err = 2.0 * (err + k if residual else err)
    factors = {"w1": (k, dz * _dot_nt(err, m0["w2"])), "w2": (z, err)}

  def read(x, name):
    left, right = factors[name]
    out = a * _dot(x, weights[name]) + b * _dot(x, momentum[name])
    return out - _dot(coef * _dot_nt(x, left), right)

  if len(weights) == 1:
    y = read(q, "w")
  else:
    y = read(activation_and_derivative(activation, read(q, "w1"))[0], "w2")
  y = y + q if residual else y

  a_end, b_end = _last(a), _last(b)
  eta_end = _last(_column(vecs, ETA_COL))
  last, mom = _column(vecs, LAST_COL), _column(vecs, MOM_COL)
  new_weights, new_momentum = {}, {}
  for name, (left, right) in factors.items():
    new_weights[name] = a_end * weights[name] + b_end * momentum[name] - _dot_tn(left, last * right)
    new_momentum[name] = eta_end * momentum[name] - _dot_tn(left, mom * right)
  return y, new_weights, new_momentum


def _refs(refs, names):
  return dict(zip(names, refs, strict=True))


def forward_kernel_tpu(*refs, names, depth, num_chunks, activation, residual):
  """TPU, grid ``(B, H, N)`` with N sequential; one chunk's tiles per grid step.

  Refs (by name): ``q, k [C,F]``, ``v [C,V]``, ``coef [C,C]``, ``vecs [C,8]``, per weight
  ``{name}_w``, ``{name}_u``, ``{name}_m0`` inputs and ``{name}_wt``, ``{name}_ut``,
  ``{name}_m0t`` outputs ``[m,n]``, ``y [C,V]``, optionally (for the backward pass) the
  weights and momentum entering the chunk ``{name}_ms``, ``{name}_us`` ``[m,n]``, and VMEM
  scratch ``{name}_sw``, ``{name}_su``, ``{name}_sm0``.
  """
  r = _refs(refs, names)
  keys = DEPTH_NAMES[depth]
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    for name in keys:
      r[f"{name}_sw"][...] = r[f"{name}_w"][...]
      r[f"{name}_su"][...] = r[f"{name}_u"][...]
      r[f"{name}_sm0"][...] = r[f"{name}_m0"][...]

  weights = {name: r[f"{name}_sw"][...] for name in keys}
  momentum = {name: r[f"{name}_su"][...] for name in keys}
  m0 = {name: r[f"{name}_sm0"][...] for name in keys}
  for name in keys:
    if f"{name}_ms" in r:
      r[f"{name}_ms"][...] = weights[name]
      r[f"{name}_us"][...] = momentum[name]
  load = lambda name: r[name][...].astype(f32)
  y, weights_out, momentum_out = _chunk_step(
    weights,
    momentum,
    m0,
    load("q"),
    load("k"),
    load("v"),
    load("coef"),
    load("vecs"),
    activation=activation,
    residual=residual,
  )
  r["y"][...] = y.astype(r["y"].dtype)
  for name in keys:
    r[f"{name}_sw"][...] = weights_out[name]
    r[f"{name}_su"][...] = momentum_out[name]
    # Every chunk after the first takes its gradients at the weights it starts from.
    r[f"{name}_sm0"][...] = weights_out[name]

  @pl.when(n == num_chunks - 1)
  def _():
    for name in keys:
      r[f"{name}_wt"][...] = weights_out[name]
      r[f"{name}_ut"][...] = momentum_out[name]
      r[f"{name}_m0t"][...] = m0[name]


def _tile_index(name, j, tile):
  """Index of hidden (depth 2) or value (depth 1) tile ``j`` of weight ``name`` ``[m,n]``.

  ``w1 [F,Dh]`` and ``w [F,V]`` are tiled by columns, ``w2 [Dh,V]`` by rows.
  """
  span = pl.ds(pl.multiple_of(j * tile, tile), tile)
  return (span, slice(None)) if name == "w2" else (slice(None), span)


def forward_kernel_gpu(*refs, names, depth, num_chunks, chunk, tile, activation, residual, barrier):
  """GPU, grid ``(B, H)``: one program walks the chunks of one sequence, the state in HBM.

  Refs as ``forward_kernel_tpu`` without scratch, with whole-sequence blocks (``q [T,F]``,
  ``coef [N,C,C]``, ``{name}_ms [N,m,n]``, ...) that the loop slices chunk by chunk, and in
  place of the carried matrices the state buffers (inputs aliased to outputs):
  ``{name}_wb [3,m,n]`` (slots 0/1: the weights entering even/odd chunks, slot 2: the first
  chunk's ``M0``) and ``{name}_ub [2,m,n]`` (the momentum, slots as the weights).

  No program holds a whole weight matrix: chunk ``n`` reads slot ``n % 2`` and writes the
  other one ``tile`` hidden units (depth 2) or value columns (depth 1) at a time, so a
  program holds ``[C,*]`` tiles of the chunk, a few ``[F,tile]``/``[tile,V]`` weight tiles and
  one ``[C,V]`` accumulator. Depth 1 is separable over value columns. Depth 2 is separable
  over hidden units except for the error ``e = 2 (act(k W1_0) W2_0 - v)``, a sum over all
  hidden units that every tile's ``d = act'(h) * (e W2_0^T)`` and second-layer update need:
  a first pass over the tiles accumulates it, a second reads and updates tile by tile
  (recomputing ``h`` for its tile) and accumulates ``y``, itself a sum over hidden units.
  Reading one slot and writing the other keeps a chunk's reads and writes apart; ``barrier``
  (a block-wide barrier, which also orders global memory within the block) separates a
  chunk's writes from the next chunk's reads by other threads. The interpreter runs the
  program sequentially and has no barrier primitive, so it runs without.
  """
  r = _refs(refs, names)
  keys = DEPTH_NAMES[depth]
  # Depth 1 tiles w's value columns, depth 2 w1's columns (the hidden units).
  num_tiles = r[f"{keys[0]}_wb"].shape[-1] // tile

  def body(n, carry):
    src = jax.lax.rem(n, jnp.int32(2))
    dst = 1 - src
    m0_slot = jnp.where(n == 0, 2, src)
    rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
    load = lambda name, cols=slice(None): r[name][rows, cols].astype(f32)
    q, k, vecs = load("q"), load("k"), load("vecs")
    coef = r["coef"][n].astype(f32)
    a, b = _column(vecs, A_COL), _column(vecs, B_COL)
    a_end, b_end = _last(a), _last(b)
    eta_end = _last(_column(vecs, ETA_COL))
    last, mom = _column(vecs, LAST_COL), _column(vecs, MOM_COL)
    scores = coef * _dot_nt(q, k)

    def weights_tile(name, j):
      idx = _tile_index(name, j, tile)
      m0 = r[f"{name}_wb"][(m0_slot, *idx)]
      w, u = r[f"{name}_wb"][(src, *idx)], r[f"{name}_ub"][(src, *idx)]
      return idx, m0, w, u

    def write(name, idx, w, u, left, right):
      if f"{name}_ms" in r:
        r[f"{name}_ms"][(n, *idx)] = w
        r[f"{name}_us"][(n, *idx)] = u
      r[f"{name}_wb"][(dst, *idx)] = a_end * w + b_end * u - _dot_tn(left, last * right)
      r[f"{name}_ub"][(dst, *idx)] = eta_end * u - _dot_tn(left, mom * right)

    if depth == 1:

      def column_tile(j, c):
        idx, m0, w, u = weights_tile("w", j)
        cols = idx[1]
        err = _dot(k, m0) - load("v", cols)
        err = 2.0 * (err + load("k", cols) if residual else err)
        y = a * _dot(q, w) + b * _dot(q, u) - _dot(scores, err)
        r["y"][rows, cols] = (y + load("q", cols) if residual else y).astype(r["y"].dtype)
        write("w", idx, w, u, k, err)
        return c

      jax.lax.fori_loop(0, num_tiles, column_tile, 0)
    else:

      def error_tile(j, err):
        _, m0_1, _, _ = weights_tile("w1", j)
        _, m0_2, _, _ = weights_tile("w2", j)
        z, _ = activation_and_derivative(activation, _dot(k, m0_1))
        return err + _dot(z, m0_2)

      err = jax.lax.fori_loop(0, num_tiles, error_tile, -load("v"))
      err = 2.0 * (err + k if residual else err)

      def hidden_tile(j, y):
        idx1, m0_1, w1, u1 = weights_tile("w1", j)
        idx2, m0_2, w2, u2 = weights_tile("w2", j)
        z, dz = activation_and_derivative(activation, _dot(k, m0_1))
        d = dz * _dot_nt(err, m0_2)
        hq = a * _dot(q, w1) + b * _dot(q, u1) - _dot(scores, d)
        zq, _ = activation_and_derivative(activation, hq)
        y = y + a * _dot(zq, w2) + b * _dot(zq, u2) - _dot(coef * _dot_nt(zq, z), err)
        write("w1", idx1, w1, u1, k, d)
        write("w2", idx2, w2, u2, z, err)
        return y

      y = jax.lax.fori_loop(0, num_tiles, hidden_tile, q if residual else jnp.zeros_like(err))
      r["y"][rows, :] = y.astype(r["y"].dtype)
    if barrier:
      plgpu.debug_barrier()
    return carry

  jax.lax.fori_loop(0, num_chunks, body, 0)
