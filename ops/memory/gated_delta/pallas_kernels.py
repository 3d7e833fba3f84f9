"""Kernel bodies shared by the Pallas TPU (Mosaic) and GPU (Triton) gated delta rule.

The chunk math lives in small functions on loaded values (``_wy_chunk``, ``_state_step``,
``_output_chunk``, ``_dstate_step``, ``_grad_chunk``); the kernel bodies only load, call them and
store. Parallel kernels (one chunk per grid point) are the same on both platforms. The two
sequential kernels (state passing forward, state-gradient passing backward) come twice: on TPU
the chunk axis is an ``arbitrary`` grid axis with the state in VMEM scratch; on GPU every grid
point is an independent program, so one program loops over the chunks with the state carried in
registers.

Per chunk, with ``G`` the within-chunk cumulative log decay (``gcol [C,1]``, the same values as
``grow [1,C]``) and ``h [K,V]`` the state entering the chunk (README.md has the derivation)::

  A[i,j] = beta_i (k_i . k_j) exp(G_i - G_j)  (j < i),   T = (I + A)^-1
  W = T (beta exp(G) K),   U = T (beta V),   Vn = U - W h   (additive: Vn = V)
  O = scale ((exp(G) Q) h + ((Q K^T) * Dm) Vn),   Dm[i,j] = exp(G_i - G_j) (j <= i)
  h' = exp(G_C) h + (exp(G_C - G) K)^T Vn

With per-channel decay (``g`` tiles ``[C,K]``) the same state-passing formulas hold with
``exp(G_C)`` scaling the rows of ``h`` (given as a ``[K,1]`` column), and ``P = (Q K^T) * Dm``
and ``W``, ``U`` arrive precomputed (``pallas_common._intra_xla``).

Packed segments (``segment_ids``) enter as ``r``, the number of segment starts in the chunk up
to each token (``rcol [C,1]``, ``rrow [1,C]``, as float32): pairs of different segments are
masked out of ``Dm`` and ``A`` (``r_i != r_j``), rows after a reset drop the entering state
(``cont = r == 0``), only the chunk's last segment reaches ``h'`` (``end = r == r_C``) and
``exp(G_C) h`` survives only a chunk without a reset (``whole``). The masks are constants of the
gradient: the backward formulas take the same masked factors.

Masks and transposes are built from iotas and matmuls (``_dot_nt``/``_dot_tn``), never from
dynamic indexing of values, because neither Mosaic nor Triton can index a row of an array value.
"""

from __future__ import annotations

import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

f32 = jnp.float32

# The dtype of every dot operand while a kernel body is traced (the precision policy: the input
# dtype, so bf16 inputs take the bf16 tensor-core path; accumulation is float32 either way).
_OPERANDS = contextvars.ContextVar("gated_delta_dot_operands", default=f32)


def operands_in(body):
  """Kernel-body decorator: ``body(..., operands=dtype)`` traces with dots on ``dtype``."""

  @functools.wraps(body)
  def run(*args, operands="float32", **kwargs):
    token = _OPERANDS.set(jnp.dtype(operands))
    try:
      return body(*args, **kwargs)
    finally:
      _OPERANDS.reset(token)

  return run


def _general(a, b, dims):
  dtype = _OPERANDS.get()
  a, b = a.astype(dtype), b.astype(dtype)
  return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=f32)


def _dot(a, b):
  """``a [M,K] @ b [K,N]``: operands in the policy dtype, float32 accumulation."""
  return _general(a, b, ((1,), (0,)))


def _dot_nt(a, b):
  """``a [M,K] @ b[N,K]^T``."""
  return _general(a, b, ((1,), (1,)))


def _dot_tn(a, b):
  """``a [K,M]^T @ b [K,N]``."""
  return _general(a, b, ((0,), (0,)))


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _last_row(g):
  """``G [C,1]`` or ``[C,K]`` -> its last row ``[1,1]`` / ``[1,K]``: the chunk's total decay."""
  C = g.shape[0]
  return jnp.sum(jnp.where(_iota(g.shape, 0) == C - 1, g, 0.0), axis=0, keepdims=True)


def _segment_factors(rcol):
  """``(cont [C,1], end [C,1], whole [1,1])`` float32 from the reset counts ``rcol``, or Nones.

  ``cont``: the token is in the segment of the entering state; ``end``: in the chunk's last
  segment; ``whole``: the chunk has no reset, so the entering state reaches the leaving one.
  """
  if rcol is None:
    return None, None, None
  last = _last_row(rcol)
  return (rcol == 0).astype(f32), (rcol == last).astype(f32), (last == 0).astype(f32)


def _mul(x, mask):
  return x if mask is None else x * mask


def _decay_matrix(gcol, grow, *, transpose: bool = False, rcol=None, rrow=None):
  """``Dm [C,C]`` with ``Dm[i,j] = exp(G_i - G_j)`` for ``j <= i`` else 0 (or its transpose).

  The exponent is masked before ``exp`` so the upper triangle (positive exponents) never
  overflows. With segments (``rcol [C,1]``, ``rrow [1,C]``), pairs of different segments are 0.
  """
  C = gcol.shape[0]
  row, col = _iota((C, C), 0), _iota((C, C), 1)
  keep = (row <= col) if transpose else (row >= col)
  if rcol is not None:
    keep = keep & (rcol == rrow)
  diff = (grow - gcol) if transpose else (gcol - grow)
  return jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0)


def _wy_chunk(k, v, bcol, brow, gcol, grow, rcol=None, rrow=None):
  """The UT/WY transform of one chunk.

  Args:
    k: ``[C,K]`` float32.
    v: ``[C,V]`` float32.
    bcol: ``[C,1]`` beta.
    brow: ``[1,C]`` the same beta as a row.
    gcol: ``[C,1]`` cumulative log decay.
    grow: ``[1,C]`` the same as a row.
    rcol, rrow: segment reset counts ``[C,1]``/``[1,C]`` or None.

  Returns:
    ``(W [C,K], U [C,V])`` float32.
  """
  C = k.shape[0]
  row, col = _iota((C, C), 0), _iota((C, C), 1)
  upper = row < col
  if rcol is not None:
    # A^T[j,i] pairs token j with token i: the same segment test, transposed.
    upper = upper & (rcol == rrow)
  # A^T, so that row i of A is a column (a lane-broadcastable [C,1] vector) of this matrix;
  # K K^T is symmetric, so A^T needs no transpose.
  a_t = jnp.where(upper, _dot_nt(k, k) * brow * jnp.exp(jnp.where(upper, grow - gcol, 0.0)), 0.0)

  def substitute(i, t):
    # Forward substitution, one row of T = (I + A)^-1 per step: T_i = e_i - sum_{j<i} A_ij T_j.
    a_i = jnp.sum(jnp.where(col == i, a_t, 0.0), axis=1, keepdims=True)  # [C,1]: A[i,j] at j
    return t - jnp.where(row == i, jnp.sum(a_i * t, axis=0, keepdims=True), 0.0)

  t = jax.lax.fori_loop(1, C, substitute, (row == col).astype(f32))
  cont = _segment_factors(rcol)[0]
  # T is block diagonal per segment, so zeroing the rows after a reset zeroes their W rows.
  return _dot(t, k * _mul(bcol * jnp.exp(gcol), cont)), _dot(t, v * bcol)


def _intra(q, k, g, grow, p, rcol=None, rrow=None):
  """The within-chunk attention ``P = (Q K^T) * decay`` ``[C,C]`` (given when per-channel)."""
  if p is not None:
    return p
  return _dot_nt(q, k) * _decay_matrix(g, grow, rcol=rcol, rrow=rrow)


def _intra_t_dot(q, k, g, grow, p, x, rcol=None, rrow=None):
  """``P^T x``; with scalar decay ``P^T`` is rebuilt as ``(K Q^T) * Dm^T``, no transpose."""
  if p is not None:
    return _dot_tn(p, x)
  dm_t = _decay_matrix(g, grow, transpose=True, rcol=rcol, rrow=rrow)
  return _dot(_dot_nt(k, q) * dm_t, x)


def _carry_factors(g, last_col, rcol):
  """``(exp(G) [C,*] for the entering state's reads, exp(G_C - G) [C,*] for the writes that
  reach ``h'``, exp(G_C) [1,1] or [K,1] for ``h`` itself)``, segment-masked."""
  cont, end, whole = _segment_factors(rcol)
  last = _last_row(g)
  last_col = last if last_col is None else last_col
  return (
    _mul(jnp.exp(g), cont),
    _mul(jnp.exp(last - g), end),
    _mul(jnp.exp(last_col), whole),
  )


def _state_step(h, k, w, u, g, last_col, rcol=None):
  """Consumes one chunk: ``h [K,V]`` -> ``(Vn [C,V], h' [K,V])``.

  ``w=None`` is the additive write. ``g`` is ``G`` as ``[C,1]`` (scalar decay) or ``[C,K]``
  (per channel); per channel, ``last_col [K,1]`` is the chunk's total decay as a column (the
  layout that scales the rows of ``h``), else None. ``rcol`` the segment reset counts or None.
  """
  vn = u if w is None else u - _dot(w, h)
  _, to_end, keep = _carry_factors(g, last_col, rcol)
  h = keep * h + _dot_tn(k * to_end, vn)
  return vn, h


def _output_chunk(q, k, vn, h, g, grow, p, scale, rcol=None, rrow=None):
  """``O [C,V]`` of one chunk from its entering state ``h [K,V]``."""
  read = _mul(jnp.exp(g), _segment_factors(rcol)[0])
  return scale * (_dot(q * read, h) + _dot(_intra(q, k, g, grow, p, rcol, rrow), vn))


def _dstate_step(dh, q, k, w, do, g, grow, p, last_col, scale, rcol=None, rrow=None):
  """Backward through one chunk's state passing.

  Args:
    dh: ``[K,V]`` gradient w.r.t. the state leaving the chunk.
    q, k: ``[C,K]``.
    w: ``[C,K]`` or ``None`` (additive).
    do: ``[C,V]`` output gradient.
    g: ``G`` as ``[C,1]`` or ``[C,K]``.
    grow: ``G`` as a row ``[1,C]`` (scalar decay) or None.
    p: the given ``P [C,C]`` (per-channel decay) or None.
    last_col: ``[K,1]`` (per-channel decay) or None.
    scale: output scale.
    rcol, rrow: segment reset counts or None.

  Returns:
    ``(dVn [C,V], dh [K,V])``: the total gradient of ``Vn`` (through the outputs and the
    leaving state) and the gradient w.r.t. the state entering the chunk.
  """
  read, to_end, keep = _carry_factors(g, last_col, rcol)
  dvn = scale * _intra_t_dot(q, k, g, grow, p, do, rcol, rrow) + _dot(k * to_end, dh)
  dh = keep * dh + scale * _dot_tn(q * read, do)
  if w is not None:
    dh = dh - _dot_tn(w, dvn)
  return dvn, dh


def _grad_chunk(q, k, vn, do, dvn, h, dh, gcol, grow, scale, rcol=None, rrow=None):
  """Per-chunk gradients (scalar decay) given the entering state ``h`` and leaving-state
  gradient ``dh`` (segment-masked when ``rcol``/``rrow`` are given).

  Returns:
    ``(dq [C,K], dk [C,K], dw [C,K] or None, dG [C,1])``: ``dk`` and ``dG`` exclude the paths
    through ``W``/``U`` (the WY transform), which the caller adds; ``dw`` is None when
    ``dvn`` is None (additive).
  """
  C = q.shape[0]
  read, to_end_decay, keep = _carry_factors(gcol, None, rcol)
  seg = {"rcol": rcol, "rrow": rrow}
  dq_inter = scale * _dot_nt(do, h) * read
  dp = scale * _dot_nt(do, vn) * _decay_matrix(gcol, grow, **seg)
  dp_t = scale * _dot_nt(vn, do) * _decay_matrix(gcol, grow, transpose=True, **seg)
  dk_state = _dot_nt(vn, dh) * to_end_decay
  dq = dq_inter + _dot(dp, k)
  dk = _dot(dp_t, q) + dk_state
  dw = None if dvn is None else -_dot_nt(dvn, h)

  rowsum = lambda x: jnp.sum(x, axis=1, keepdims=True)
  to_end = rowsum(k * dk_state)  # [C,1]
  dg = rowsum(q * dq_inter) + rowsum(dp * _dot_nt(q, k)) - rowsum(dp_t * _dot_nt(k, q)) - to_end
  d_last = jnp.sum(to_end, axis=0, keepdims=True) + keep * jnp.sum(
    rowsum(h * dh), axis=0, keepdims=True
  )
  dg = dg + jnp.where(_iota((C, 1), 0) == C - 1, d_last, 0.0)
  return dq, dk, dw, dg


def _grad_chunk_channel(q, k, vn, do, dvn, h, dh, g, scale, rcol=None):
  """Per-chunk gradients with per-channel decay ``g = G [C,K]``.

  Returns:
    ``(dq, dk, dw or None, dG [C,K], dP [C,C])``: the parts through the inter-chunk output and
    the state; the caller adds the paths through ``P``, ``W``, ``U`` (computed in XLA) and the
    ``exp(G_C) sum_v h * dh`` term of the last row.
  """
  C = q.shape[0]
  read, to_end_decay, _ = _carry_factors(g, None, rcol)
  dq = scale * _dot_nt(do, h) * read
  dk = _dot_nt(vn, dh) * to_end_decay
  dw = None if dvn is None else -_dot_nt(dvn, h)
  row, col = _iota((C, C), 0), _iota((C, C), 1)
  dp = jnp.where(row >= col, scale * _dot_nt(do, vn), 0.0)
  to_end = k * dk
  last_row = jnp.where(_iota(g.shape, 0) == C - 1, jnp.sum(to_end, axis=0, keepdims=True), 0.0)
  return dq, dk, dw, q * dq - to_end + last_row, dp


# ---------------------------------------------------------------------------------------------
# Kernel bodies. Refs arrive positionally and are named by the host (``names``), since which
# operands exist depends on the mode (delta/additive, scalar/per-channel decay).

# Operands stored once per chunk ([B,H,N,...]) rather than per token ([B,H,T,...]).
_PER_CHUNK = ("grow", "p", "glast", "rrow")


def _tile_loader(r):
  """Loads whole blocks (one chunk per grid step) as float32; absent operands are None."""
  return lambda name: r[name][...].astype(f32) if name in r else None


def _chunk_loader(r, n, chunk):
  """Loads chunk ``n`` out of whole-sequence blocks (GPU sequential kernels)."""
  rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)

  def load(name):
    if name not in r:
      return None
    return (r[name][n] if name in _PER_CHUNK else r[name][rows, :]).astype(f32)

  return load, rows


@operands_in
def wy_kernel(*refs, names):
  """Parallel over chunks: ``k [C,K], v [C,V]`` -> ``w [C,K], u [C,V]`` float32."""
  r = dict(zip(names, refs, strict=True))
  load = _tile_loader(r)
  w, u = _wy_chunk(
    load("k"), load("v"), load("bcol"), load("brow"), load("g"), load("grow"), *_seg(load)
  )
  r["w"][...] = w
  r["u"][...] = u


def _seg(load):
  """``(rcol, rrow)``: the segment reset counts, or Nones without segments."""
  return load("rcol"), load("rrow")


@operands_in
def output_kernel(*refs, names, scale):
  """Parallel over chunks: ``o [C,V]`` from ``q, k [C,K]``, ``vn [C,V]``, state ``h [K,V]``."""
  r = dict(zip(names, refs, strict=True))
  load = _tile_loader(r)
  o = _output_chunk(
    load("q"),
    load("k"),
    load("vn"),
    load("h"),
    load("g"),
    load("grow"),
    load("p"),
    scale,
    *_seg(load),
  )
  r["o"][...] = o.astype(r["o"].dtype)


@operands_in
def grad_kernel(*refs, names, scale):
  """Parallel over chunks: ``dq, dk [C,K]`` (+ ``dw``), ``dg`` (+ ``dp`` per channel)."""
  r = dict(zip(names, refs, strict=True))
  load = _tile_loader(r)
  args = (load("q"), load("k"), load("vn"), load("do"), load("dvn"), load("h"), load("dh"))
  if "p_out" in r:
    dq, dk, dw, dg, dp = _grad_chunk_channel(*args, load("g"), scale, load("rcol"))
    r["p_out"][...] = dp
  else:
    dq, dk, dw, dg = _grad_chunk(*args, load("g"), load("grow"), scale, *_seg(load))
  r["dq"][...] = dq
  r["dk"][...] = dk
  if dw is not None:
    r["dw"][...] = dw
  r["dg"][...] = dg


def _state_args(load):
  return load("k"), load("w"), load("u"), load("g"), load("glast"), load("rcol")


@operands_in
def state_fwd_kernel_tpu(*refs, names, num_chunks):
  """TPU, grid ``(B, H, V/BV, N)`` with N sequential: stores each chunk's entering state."""
  r = dict(zip(names, refs, strict=True))
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _():
    r["scratch"][...] = r["h0"][...]

  h = r["scratch"][...]
  r["hs"][...] = h
  load = _tile_loader(r)
  vn, h = _state_step(h, *_state_args(load))
  if "vn" in r:
    r["vn"][...] = vn
  r["scratch"][...] = h

  @pl.when(n == num_chunks - 1)
  def _():
    r["ht"][...] = h


@operands_in
def state_fwd_kernel_gpu(*refs, names, num_chunks, chunk):
  """GPU, grid ``(B, H, V/BV)``: one program loops over the chunks of one sequence."""
  r = dict(zip(names, refs, strict=True))

  def body(n, h):
    load, rows = _chunk_loader(r, n, chunk)
    r["hs"][n] = h
    vn, h = _state_step(h, *_state_args(load))
    if "vn" in r:
      r["vn"][rows, :] = vn
    return h

  r["ht"][...] = jax.lax.fori_loop(0, num_chunks, body, r["h0"][...])


def _dstate(load, dh, scale):
  return _dstate_step(
    dh,
    load("q"),
    load("k"),
    load("w"),
    load("do"),
    load("g"),
    load("grow"),
    load("p"),
    load("glast"),
    scale,
    *_seg(load),
  )


@operands_in
def state_bwd_kernel_tpu(*refs, names, num_chunks, scale):
  """TPU, grid ``(B, H, V/BV, N)`` with chunks visited last to first."""
  r = dict(zip(names, refs, strict=True))
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _():
    r["scratch"][...] = r["dht"][...]

  dh = r["scratch"][...]
  r["dhs"][...] = dh
  dvn, dh = _dstate(_tile_loader(r), dh, scale)
  r["dvn"][...] = dvn
  r["scratch"][...] = dh

  @pl.when(n == num_chunks - 1)
  def _():
    r["dh0"][...] = dh


@operands_in
def state_bwd_kernel_gpu(*refs, names, num_chunks, chunk, scale):
  """GPU, grid ``(B, H, V/BV)``: one program walks the chunks last to first."""
  r = dict(zip(names, refs, strict=True))

  def body(i, dh):
    n = num_chunks - 1 - i
    load, rows = _chunk_loader(r, n, chunk)
    r["dhs"][n] = dh
    dvn, dh = _dstate(load, dh, scale)
    r["dvn"][rows, :] = dvn
    return dh

  r["dh0"][...] = jax.lax.fori_loop(0, num_chunks, body, r["dht"][...])
