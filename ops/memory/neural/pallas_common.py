"""Host side of the Pallas neural memory, shared by ``pallas_tpu`` and ``pallas_gpu``.

Scope: the Titans configuration. The l2 objective on given targets (not ``self_targets``),
momentum optimiser, Omega window 1 (per-token weights ``omega_weights`` included), depth 1 and
depth 2 memories with any activation and the residual read, a chunk grid whose offset is static
(any ``position % chunk_size`` known at trace time).
Everything else raises ``NotSupportedError`` so a sequence of implementations falls back.

Forward: inputs go head-major ``[B,H,T,*]`` on the chunk grid (the ``o = position % C`` slots
before the first token and the tail padding get ``theta = 0``, ``eta = 1``, ``alpha = 0`` and
are masked out of the weight updates, as in ``xla.py``); the gate coefficients, which do not
depend on the weights, are built in XLA for all chunks at once (``_coefficients``: a few
``[C,C]`` products per chunk, parallel over chunks); one kernel then walks the chunks
(``pallas_kernels``).

Backward: a ``custom_vjp``. Its forward rule also stores the weights and momentum entering
every chunk; its backward (``pallas_backward``) is a reverse ``lax.scan`` of the VJP of
``xla.py``'s chunk map from those states, i.e. xla's backward without xla's forward. A Pallas
backward kernel is not written yet.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from ops.common.dispatch import NotSupportedError
from ops.memory.neural import common, pallas_backward, xla
from ops.memory.neural import pallas_kernels as kern

f32 = jnp.float32
HIGHEST = common.HIGHEST
_SQ = pl.squeezed


@dataclasses.dataclass(frozen=True)
class Config:
  """Static arguments of the kernel.

  Attributes:
    platform: ``"tpu"`` (Mosaic) or ``"gpu"`` (Triton).
    chunk: chunk size ``C``.
    offset: ``position % C`` of the first token (static).
    activation: the depth-2 nonlinearity.
    residual: read ``x + M(x)``.
    interpret: run the kernel in the Pallas interpreter (TPU: NaN-filled fresh buffers).
  """

  platform: str
  chunk: int
  offset: int
  activation: str
  residual: bool
  interpret: bool

  @property
  def xla_options(self):
    """The keyword arguments of ``xla._chunk`` for this configuration."""
    return dict(
      window=1,
      objective="l2",
      optimizer="momentum",
      ns_steps=0,
      self_targets=False,
      activation=self.activation,
      residual=self.residual,
    )


def _interpret(cfg: Config):
  if not cfg.interpret:
    return False
  if cfg.platform == "tpu":
    # Fresh outputs and scratch start as NaN, so any element the kernel forgets to write fails.
    return pltpu.InterpretParams(uninitialized_memory="nan")
  return True


def _coefficients(theta, eta, keep, valid, gamma):
  """The gate coefficients of every chunk (the README's ``coef``, ``A``, ``b``, ...).

  With the Omega window 1, ``Omega = diag(valid * gamma)``, so each token's gradient enters
  with the weight ``w_s = theta_s gamma_s valid_s``.

  Args:
    theta, eta, keep, valid, gamma: ``[B,H,N,C]`` float32 (``keep = 1 - alpha``; ``valid`` 1
      on real tokens, 0 on grid padding).

  Returns:
    ``(coef [B,H,N,C,C], vecs [B,H,N*C,8])``; ``vecs`` columns as ``pallas_kernels.A_COL`` ...
  """
  step = theta * gamma * valid
  # E[i, j] = prod_{l=j+1..i} x_l from cumprods of masked tables, as in xla.py.
  eta_seg = xla._segment_products(eta)
  # Padding slots must not add the momentum to the weights: their columns of E^a are zero.
  keep_seg = xla._segment_products(keep) * valid[..., None, :]
  eta_cum = jnp.cumprod(eta, axis=-1)
  coef = jnp.einsum("...im,...mj->...ij", keep_seg, eta_seg * step[..., None, :], precision=HIGHEST)
  b = jnp.einsum("...im,...m->...i", keep_seg, eta_cum, precision=HIGHEST)
  mom = eta_seg[..., -1, :] * step
  cols = [jnp.cumprod(keep, axis=-1), b, eta_cum, coef[..., -1, :], mom]
  cols += [jnp.zeros_like(b)] * (kern.NUM_VECS - len(cols))
  vecs = jnp.stack(cols, axis=-1)
  B, H, N, C, _ = vecs.shape
  return coef, vecs.reshape(B, H, N * C, kern.NUM_VECS)


def _grid_layout(cfg, q, k, v, theta, eta, alpha, gamma):
  """``[B,T,H,*]`` inputs -> head-major ``[B,H,N*C,*]`` operands on the chunk grid."""
  B, T, H, _ = q.shape
  C, o = cfg.chunk, cfg.offset
  N = -(-(o + T) // C)
  pad = [(o, N * C - o - T)]

  def place(x, fill):
    x = jnp.swapaxes(x, 1, 2)  # [B,H,T,...]
    return jnp.pad(x, [(0, 0), (0, 0)] + pad + [(0, 0)] * (x.ndim - 3), constant_values=fill)

  ones = jnp.ones_like(theta)
  by_chunk = lambda x: x.reshape(B, H, N, C)
  gates = (
    by_chunk(place(theta, 0.0)),
    by_chunk(place(eta, 1.0)),
    by_chunk(place(1.0 - alpha, 1.0)),
    by_chunk(place(ones, 0.0)),
    by_chunk(place(gamma, 0.0)),
  )
  coef, vecs = _coefficients(*gates)
  return place(q, 0.0), place(k, 0.0), place(v, 0.0), coef, vecs, N


# Per-program budget of the GPU kernel, in the measure of ``tests/ops/test_kernel_footprint.py``
# (the tiles a program loads plus the values its loops carry): half of the 227 KiB of shared
# memory one block may use on H100/H200, leaving the rest for the body's intermediates (``h``,
# ``z``, ``d``, the ``[C,C]`` scores) and Triton's staging of dot operands.
GPU_PROGRAM_BUDGET = 128 * 1024


def gpu_program_bytes(depth, chunk, fdim, vdim, hidden, tile, residual=False):
  """Bytes one GPU program loads and carries with ``tile`` hidden units (value columns)."""
  C, F, V = chunk, fdim, vdim
  floats = 2 * C * F + C * kern.NUM_VECS + C * C  # q, k, vecs, coef of the chunk
  if depth == 1:
    # per value tile: M0, W, U [F,tile] and v (q and k with residual) [C,tile]
    floats += 3 * F * tile + C * tile * (3 if residual else 1)
  else:
    pair = F * tile + tile * V  # one tile of w1 and of w2
    # v [C,V]; the error pass: M0's tiles and the [C,V] error; the read/update pass: M0, W, U
    # tiles of both and the [C,V] output
    floats += C * V + pair + C * V + 3 * pair + C * V
  return 4 * floats


def gpu_tile(depth, chunk, fdim, vdim, hidden, residual=False):
  """The widest power-of-two tile (>= 16, dividing the tiled width) within the budget.

  Raises:
    NotSupportedError: not even a 16-wide tile fits.
  """
  width = vdim if depth == 1 else hidden
  tile = width
  while tile >= 16:
    if gpu_program_bytes(depth, chunk, fdim, vdim, hidden, tile, residual) <= GPU_PROGRAM_BUDGET:
      return tile
    tile //= 2
  raise NotSupportedError(
    f"the GPU kernel exceeds {GPU_PROGRAM_BUDGET // 1024} KiB per program at "
    f"C={chunk}, F={fdim}, V={vdim}, hidden={hidden} even with 16-wide tiles"
  )


def _call(cfg, q, k, v, coef, vecs, weights, momentum, m0, save_states):
  """The ``pallas_call``.

  Returns:
    ``(y [B,H,N*C,V], weights, momentum, last chunk's M0, states)``: ``states`` is
    ``(weights, momentum)`` entering every chunk, ``{name: [B,H,N,m,n]}``, with
    ``save_states``, else None.
  """
  if cfg.platform == "gpu":
    return _call_gpu(cfg, q, k, v, coef, vecs, weights, momentum, m0, save_states)
  B, H, Tp, F = q.shape
  V = v.shape[-1]
  C = cfg.chunk
  N = Tp // C
  depth = len(weights)
  keys = kern.DEPTH_NAMES[depth]
  grid = (B, H, N)
  seq = lambda D: pl.BlockSpec((_SQ, _SQ, C, D), lambda b, h, n: (b, h, n, 0))
  chunked = pl.BlockSpec((_SQ, _SQ, _SQ, C, C), lambda b, h, n: (b, h, n, 0, 0))
  state = lambda s: pl.BlockSpec((_SQ, _SQ, *s), lambda b, h, n: (b, h, 0, 0))
  states = lambda s: pl.BlockSpec((_SQ, _SQ, _SQ, *s), lambda b, h, n: (b, h, n, 0, 0))

  shapes = {name: weights[name].shape[-2:] for name in keys}
  ins = [("q", q, seq(F)), ("k", k, seq(F)), ("v", v, seq(V))]
  ins += [("coef", coef, chunked), ("vecs", vecs, seq(kern.NUM_VECS))]
  for name in keys:
    spec = state(shapes[name])
    ins += [(f"{name}_w", weights[name], spec), (f"{name}_u", momentum[name], spec)]
    ins += [(f"{name}_m0", m0[name], spec)]
  outs = [("y", jax.ShapeDtypeStruct((B, H, Tp, V), f32), seq(V))]
  for name in keys:
    shape = jax.ShapeDtypeStruct((B, H, *shapes[name]), f32)
    outs += [(f"{name}_{s}", shape, state(shapes[name])) for s in ("wt", "ut", "m0t")]
  if save_states:
    for name in keys:
      shape = jax.ShapeDtypeStruct((B, H, N, *shapes[name]), f32)
      outs += [(f"{name}_{s}", shape, states(shapes[name])) for s in ("ms", "us")]
  names = [x[0] for x in ins] + [x[0] for x in outs]
  config = dict(depth=depth, num_chunks=N, activation=cfg.activation, residual=cfg.residual)
  scratch = [pltpu.VMEM(shapes[name], f32) for name in keys for _ in range(3)]
  names += [f"{name}_{s}" for name in keys for s in ("sw", "su", "sm0")]
  kernel = functools.partial(kern.forward_kernel_tpu, names=tuple(names), **config)
  params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
  results = pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=[x[2] for x in ins],
    out_specs=[x[2] for x in outs],
    out_shape=[x[1] for x in outs],
    scratch_shapes=scratch,
    compiler_params=params,
    interpret=_interpret(cfg),
  )(*[x[1] for x in ins])
  r = dict(zip([x[0] for x in outs], results, strict=True))
  pick = lambda s: {name: r[f"{name}_{s}"] for name in keys}
  saved = (pick("ms"), pick("us")) if save_states else None
  return r["y"], pick("wt"), pick("ut"), pick("m0t"), saved


def _call_gpu(cfg, q, k, v, coef, vecs, weights, momentum, m0, save_states):
  """``_call`` for Triton: grid ``(B, H)``, the state in HBM buffers (``forward_kernel_gpu``).

  The buffers are inputs aliased to outputs: the weights ``[B,H,3,m,n]`` start as
  ``(W, NaN, M0)`` and the momentum ``[B,H,2,m,n]`` as ``(U, NaN)``; the NaN slot is written
  by the first chunk before anything reads it, so a wrong slot shows up in every output.
  After ``N`` chunks slot ``N % 2`` holds the final state and slot ``(N - 1) % 2`` (2 when
  ``N == 1``) the last chunk's ``M0``.
  """
  B, H, Tp, F = q.shape
  V = v.shape[-1]
  C = cfg.chunk
  N = Tp // C
  depth = len(weights)
  keys = kern.DEPTH_NAMES[depth]
  hidden = weights["w1"].shape[-1] if depth == 2 else None
  tile = gpu_tile(depth, C, F, V, hidden, cfg.residual)
  seq = lambda D: pl.BlockSpec((_SQ, _SQ, Tp, D), lambda b, h: (b, h, 0, 0))
  lead = lambda *s: pl.BlockSpec((_SQ, _SQ, *s), lambda b, h: (b, h) + (0,) * len(s))
  shapes = {name: weights[name].shape[-2:] for name in keys}
  nan = lambda x: jnp.full_like(x, jnp.nan)
  ins = [("q", q, seq(F)), ("k", k, seq(F)), ("v", v, seq(V))]
  ins += [("coef", coef, lead(N, C, C)), ("vecs", vecs, seq(kern.NUM_VECS))]
  outs = [("y", jax.ShapeDtypeStruct((B, H, Tp, V), f32), seq(V))]
  aliases = {}
  for name in keys:
    w, u = weights[name], momentum[name]
    for s, init in (("wb", (w, nan(w), m0[name])), ("ub", (u, nan(u)))):
      buf = jnp.stack(init, axis=2)
      aliases[len(ins)] = len(outs)
      ins.append((f"{name}_{s}", buf, lead(*buf.shape[2:])))
      outs.append((f"{name}_{s}", jax.ShapeDtypeStruct(buf.shape, f32), lead(*buf.shape[2:])))
  if save_states:
    for name in keys:
      shape = jax.ShapeDtypeStruct((B, H, N, *shapes[name]), f32)
      outs += [(f"{name}_{s}", shape, lead(N, *shapes[name])) for s in ("ms", "us")]
  # Inputs and outputs share a name for the aliased buffers; the kernel uses the output refs.
  names = [f"in_{x[0]}" if i in aliases else x[0] for i, x in enumerate(ins)]
  names += [x[0] for x in outs]
  kernel = functools.partial(
    kern.forward_kernel_gpu,
    names=tuple(names),
    depth=depth,
    num_chunks=N,
    chunk=C,
    tile=tile,
    activation=cfg.activation,
    residual=cfg.residual,
    barrier=not cfg.interpret,
  )
  results = pl.pallas_call(
    kernel,
    grid=(B, H),
    in_specs=[x[2] for x in ins],
    out_specs=[x[2] for x in outs],
    out_shape=[x[1] for x in outs],
    input_output_aliases=aliases,
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    interpret=_interpret(cfg),
  )(*[x[1] for x in ins])
  r = dict(zip([x[0] for x in outs], results, strict=True))
  slot = lambda s, i: {name: r[f"{name}_{s}"][:, :, i] for name in keys}
  saved = None
  if save_states:
    saved = tuple({name: r[f"{name}_{s}"] for name in keys} for s in ("ms", "us"))
  m0_last = 2 if N == 1 else (N - 1) % 2
  return r["y"], slot("wb", N % 2), slot("ub", N % 2), slot("wb", m0_last), saved


def _forward(
  cfg, q, k, v, theta, eta, alpha, gamma, weights, momentum, chunk_start, save_states=False
):
  """Kernel forward: ``((y [B,T,H,V], weights, momentum, chunk_start), states)``.

  The first four are the values after the input; ``states`` is ``_call``'s.
  """
  T = q.shape[1]
  o = cfg.offset
  qp, kp, vp, coef, vecs, _ = _grid_layout(cfg, q, k, v, theta, eta, alpha, gamma)
  m0 = weights if o == 0 else chunk_start
  y, weights, momentum, last_m0, states = _call(
    cfg, qp, kp, vp, coef, vecs, weights, momentum, m0, save_states
  )
  y = jnp.swapaxes(y[:, :, o : o + T], 1, 2)
  # The next token opens a new chunk exactly when the input ends on a chunk boundary.
  chunk_start = weights if (o + T) % cfg.chunk == 0 else last_m0
  return (y, weights, momentum, chunk_start), states


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _neural_memory(cfg, *args):
  return _forward(cfg, *args)[0]


def _neural_memory_fwd(cfg, *args):
  outs, states = _forward(cfg, *args, save_states=True)
  return outs, (args, states)


def _neural_memory_bwd(cfg, res, cotangents):
  args, states = res
  return pallas_backward.backward(cfg, args, states, cotangents)


_neural_memory.defvjp(_neural_memory_fwd, _neural_memory_bwd)


def _check_supported(
  platform, chunk, offset, window, objective, optimizer, self_targets, fdim, vdim, hidden
):
  if self_targets:
    # The kernel streams the targets in; self-generated ones would be read at M0 in-kernel.
    raise NotSupportedError("the Pallas kernel does not cover self_targets=True")
  if objective != "l2":
    # The kernel forms the l2 error 2 (M0(k) - v) in-kernel; "dot" would need another body.
    raise NotSupportedError(f"the Pallas kernel covers objective='l2', not {objective!r}")
  if optimizer != "momentum":
    raise NotSupportedError(f"the Pallas kernel covers optimizer='momentum', not {optimizer!r}")
  if window != 1:
    raise NotSupportedError(f"the Pallas kernel covers omega_window=1, not {window}")
  if offset is None:
    raise NotSupportedError("the Pallas kernel needs a static chunk offset (a traced position)")
  if chunk < 8:
    raise NotSupportedError(f"the Pallas kernel needs chunk_size >= 8, got {chunk}")
  pow2_16 = lambda n: n >= 16 and n & (n - 1) == 0
  dims = {"C": chunk, "F": fdim, "V": vdim} | ({} if hidden is None else {"hidden": hidden})
  if platform == "gpu" and not all(pow2_16(n) for n in dims.values()):
    raise NotSupportedError(f"Triton needs powers of two >= 16 for every tile dim, got {dims}")


def neural_memory_pallas(
  q,
  k,
  v,
  theta,
  eta,
  alpha,
  gamma,
  state,
  *,
  chunk_size,
  offset=None,
  window=1,
  objective="l2",
  optimizer="momentum",
  ns_steps=5,
  activation="silu",
  residual=False,
  self_targets=False,
  interpret=False,
  platform,
):
  """Neural memory with the Pallas forward kernel; same contract as ``xla.neural_memory``.

  Args:
    q, k: [B,T,H,F] feature-mapped float32.
    v: [B,T,H,V] float32.
    theta, eta, alpha, gamma: [B,T,H] float32 (lr, momentum, decay, Omega weight).
    state: the state dict at the first token (``api._as_state``).
    chunk_size: C (a power of two >= 8).
    offset: static ``position % chunk_size``; None (traced) is not supported.
    window, objective, optimizer, self_targets: must be 1, "l2", "momentum" and False.
    ns_steps: unused (Muon only).
    activation, residual: the memory MLP's options.
    interpret: run the kernel in the Pallas interpreter (CPU testing).
    platform: "tpu" or "gpu".

  Returns:
    ``(y [B,T,H,V] float32, final_state)``.

  Raises:
    NotSupportedError: an option or shape the kernel does not cover.
  """
  del ns_steps
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"platform must be 'tpu' or 'gpu', got {platform!r}")
  weights = state["weights"]
  hidden = weights["w1"].shape[-1] if "w1" in weights else None
  F, V = q.shape[-1], v.shape[-1]
  _check_supported(
    platform, chunk_size, offset, window, objective, optimizer, self_targets, F, V, hidden
  )
  if platform == "gpu":
    gpu_tile(1 if hidden is None else 2, chunk_size, F, V, hidden, bool(residual))
  cfg = Config(
    platform=platform,
    chunk=chunk_size,
    offset=int(offset),
    activation=activation,
    residual=bool(residual),
    interpret=bool(interpret),
  )
  args = (q, k, v, theta, eta, alpha, gamma, weights, state["momentum"], state["chunk_start"])
  y, weights, momentum, chunk_start = _neural_memory(
    cfg, *jax.tree.map(lambda x: jnp.asarray(x, f32), args)
  )
  final = {
    "weights": weights,
    "momentum": momentum,
    "chunk_start": chunk_start,
    "position": state["position"] + q.shape[1],
    # Window 1 keeps no past tokens.
    "window_k": state["window_k"],
    "window_v": state["window_v"],
    "window_gamma": state["window_gamma"],
  }
  return y, final


__all__ = ["Config", "neural_memory_pallas"]
