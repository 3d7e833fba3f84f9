"""Per-program memory of every Pallas kernel at the shapes of every preset, checked on CPU.

Each preset's model is traced abstractly (``jax.eval_shape``) with packed documents while the
public ops record their calls; every distinct call is then traced again through its Pallas
implementations for GPU (Triton) and TPU (Mosaic), forward and backward, with
``interpret=False``, and each ``pallas_call`` in the jaxpr is measured:

- TPU: the sum over inputs and outputs of one block's bytes, twice (Mosaic double-buffers every
  pipelined block), plus the scratch buffers, against 16 MiB: the default scoped-VMEM limit of
  TPU v5e (v6e's is 32 MiB, so 16 MiB fits both).
- GPU: Pallas-Triton stages no blocks (a block is a pointer); a program holds what its body
  loads plus the values its loops carry. Loads inside a loop count ``num_stages`` times (Triton
  multi-buffers them when it pipelines the loop). Against 227 KiB, the shared memory one block
  may use on H100/H200. Registers spill to shared memory (or local memory) the same way, so this
  is the quantity that must fit; intermediates inside the body are not counted.

So a kernel that cannot fit fails here, on CPU, not on the device; ``test_checker_rejects_*``
show the checker fails an oversized block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import pallas as pl

import ops.attention
import ops.memory
import ops.memory.neural
import zoo
from ops.attention import pallas_gpu as attn_gpu
from ops.common.dispatch import NotSupportedError
from ops.memory.gated_delta import pallas_common as gd_pallas

GPU_SHARED_BYTES = 227 * 1024  # H100 / H200: max dynamic shared memory per thread block
TPU_VMEM_BYTES = 16 * 1024 * 1024  # TPU v5e default scoped VMEM (v6e: 32 MiB)
# Presets without max_len (wrappers such as HMT, InfLLM, landmark) are traced at 1024 tokens:
# every per-program block is full there, and tracing their Python-level segment loops at 4096
# would dominate the run. Others at their max_len (at most 4096).
_TRACE_T = 4096
_DEFAULT_T = 1024


def _itemsize(aval) -> int:
  return jnp.dtype(aval.dtype).itemsize


def _block_bytes(block_mapping) -> int:
  aval = block_mapping.array_aval
  dims = [getattr(d, "block_size", 1) or 1 for d in block_mapping.block_shape]
  return math.prod(int(d) for d in dims) * _itemsize(aval)


def _aval_bytes(aval) -> int:
  return math.prod(aval.shape) * _itemsize(aval) if hasattr(aval, "shape") else 0


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for sub in value if isinstance(value, (list, tuple)) else (value,):
      if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
        yield sub.jaxpr
      elif hasattr(sub, "eqns"):
        yield sub


def _gpu_body_bytes(jaxpr, stages: int, in_loop: bool = False) -> int:
  """Bytes a Triton program holds: loaded tiles (x stages inside loops) and loop carries."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ("get", "load", "masked_load"):
      total += sum(_aval_bytes(v.aval) for v in eqn.outvars) * (stages if in_loop else 1)
    loop = name in ("scan", "while")
    if name == "scan":
      total += sum(_aval_bytes(v.aval) for v in eqn.outvars[: eqn.params["num_carry"]])
    elif name == "while":
      total += sum(_aval_bytes(v.aval) for v in eqn.outvars)
    for sub in _subjaxprs(eqn):
      total += _gpu_body_bytes(sub, stages, in_loop or loop)
  return total


def pallas_calls(jaxpr):
  """Every ``pallas_call`` equation in ``jaxpr``, through nested jaxprs."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
    for sub in _subjaxprs(eqn):
      yield from pallas_calls(sub)


def footprint(eqn, platform: str) -> int:
  """Per-program bytes of one ``pallas_call`` (see the module docstring)."""
  grid = eqn.params["grid_mapping"]
  if platform == "tpu":
    blocks = sum(_block_bytes(bm) for bm in grid.block_mappings)
    scratch_vars = eqn.params["jaxpr"].invars[
      len(eqn.params["jaxpr"].invars) - grid.num_scratch_operands :
    ]
    scratch = sum(_aval_bytes(v.aval) for v in scratch_vars) if grid.num_scratch_operands else 0
    return 2 * blocks + scratch
  params = eqn.params["compiler_params"]
  params = params.get("triton", params) if isinstance(params, dict) else params
  stages = getattr(params, "num_stages", None) or 1
  return _gpu_body_bytes(eqn.params["jaxpr"], stages)


LIMITS = {"gpu": GPU_SHARED_BYTES, "tpu": TPU_VMEM_BYTES}

# Kernels known not to fit, with the reason; the tests fail if one of them starts to fit (so the
# entry is removed) or another kernel goes over. None at present.
KNOWN_OVER: set[tuple[str, str]] = set()


def _kernel_name(eqn) -> str:
  """The kernel body's function name (``state_fwd_kernel_gpu``), from the jaxpr's debug info."""
  info = getattr(eqn.params["jaxpr"].debug_info, "func_src_info", None) or ""
  return info.split(" ")[0] or str(eqn.params.get("name"))


def measure(fn, args, platform: str, backward: bool = True) -> list[tuple[str, int]]:
  """``[(kernel, bytes)]`` of every kernel in forward (+ backward) of ``fn(*args)``."""
  floats = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]

  def fwd_bwd(*xs):
    def f(*fl):
      full = list(xs)
      for i, x in zip(floats, fl, strict=True):
        full[i] = x
      return fn(*full)

    out, vjp = jax.vjp(f, *[xs[i] for i in floats])
    return vjp(jax.tree.map(jnp.ones_like, out))

  jaxpr = jax.make_jaxpr(fwd_bwd if backward else fn)(*args)
  return [(_kernel_name(e), footprint(e, platform)) for e in pallas_calls(jaxpr.jaxpr)]


def check_footprints(fn, args, platform: str, backward: bool = True) -> list[tuple[str, int]]:
  """:func:`measure`, raising ``AssertionError`` naming each kernel past ``LIMITS[platform]``."""
  sizes = measure(fn, args, platform, backward)
  assert sizes, "no pallas_call was traced"
  over = [(n, b) for n, b in sizes if b > LIMITS[platform]]
  assert not over, (
    f"{platform}: kernels over {LIMITS[platform] // 1024} KiB per program: "
    + ", ".join(f"{n} {b // 1024} KiB" for n, b in over)
  )
  return sizes


# --- the op calls of every preset --------------------------------------------------------------

_RECORDED = {"gated_delta_rule": (ops.memory, "gated_delta_rule")}
_RECORDED["dot_product_attention"] = (ops.attention, "dot_product_attention")
_RECORDED["neural_memory"] = (ops.memory.neural, "neural_memory")


def _abstract(x):
  if isinstance(x, (jax.Array, jax.core.Tracer, np.ndarray)):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


def _key(op, args, kwargs):
  return repr((op, jax.tree.map(_abstract, (args, kwargs))))


@functools.cache
def preset_calls():
  """``{key: (op, args, kwargs)}``: each distinct op call of every preset, arrays abstract."""
  calls = {}
  originals = {op: getattr(mod, name) for op, (mod, name) in _RECORDED.items()}

  def recorder(op):
    def run(*args, **kwargs):
      a, kw = jax.tree.map(_abstract, (args, kwargs))
      calls.setdefault(_key(op, args, kwargs), (op, a, kw))
      return originals[op](*args, **kwargs)

    return run

  for op, (mod, name) in _RECORDED.items():
    setattr(mod, name, recorder(op))
  try:
    for model in zoo.list_models():
      for preset in zoo.presets(model):
        cfg = zoo.config(model, preset)
        T = min(getattr(cfg, "max_len", _DEFAULT_T), _TRACE_T)
        abstract = nnx.eval_shape(lambda cfg=cfg: zoo.build(cfg))
        graphdef, state = nnx.split(abstract)
        tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
        forward = lambda st, tok, seg, g=graphdef: nnx.merge(g, st)(tok, segment_ids=seg)
        try:
          jax.eval_shape(forward, state, tokens, tokens)
        except ValueError as e:
          if "segment_ids" not in str(e):
            raise
          # A family that refuses packed documents (one stream per row) trains without them.
          jax.eval_shape(forward, state, tokens, None)
  finally:
    for op, (mod, name) in _RECORDED.items():
      setattr(mod, name, originals[op])
  return calls


def _gated_delta_kernel(platform, args, kwargs):
  """The recorded public call, through ``pallas_common`` (padding T as ``api.py`` does)."""
  q, k, v = args
  kw = dict(kwargs)
  g, beta, seg = kw.get("g"), kw.get("beta"), kw.get("segment_ids")
  s0 = kw.get("initial_state")
  K = q.shape[-1]
  C = kw.get("chunk_size", 64)
  if kw.get("prefix_len"):
    seg = None  # the prefix and the rest are two calls of the same kernels
  operands = [q, k, v, g, beta, s0, seg]
  present = [i for i, x in enumerate(operands) if x is not None]
  scale = kw.get("scale") or K**-0.5

  def fn(*xs):
    full = [None] * len(operands)
    for i, x in zip(present, xs, strict=True):
      full[i] = x
    q, k, v, g, beta, s0, seg = full
    g = None if g is None else g.astype(jnp.float32)
    beta = None if beta is None else beta.astype(jnp.float32)
    o, state = gd_pallas.chunk_gated_delta_rule(
      q,
      k,
      v,
      g,
      beta,
      scale=float(scale),
      initial_state=s0,
      chunk_size=C,
      interpret=False,
      platform=platform,
      segment_ids=seg,
    )
    return o, state

  return fn, [operands[i] for i in present]


def _public(op, platform, args, kwargs):
  names = {"dot_product_attention": ops.attention, "neural_memory": ops.memory.neural}
  fn = getattr(names[op], op)
  leaves, tree = jax.tree.flatten((args, kwargs))
  arrays = [i for i, x in enumerate(leaves) if isinstance(x, jax.ShapeDtypeStruct)]

  def call(*xs):
    full = list(leaves)
    for i, x in zip(arrays, xs, strict=True):
      full[i] = x
    a, kw = jax.tree.unflatten(tree, full)
    kw = {**kw, "implementation": f"pallas_{platform}", "interpret": False}
    return fn(*a, **kw)

  return call, [leaves[i] for i in arrays]


def _ids(calls):
  return [c[0] for c in calls.values()]


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_every_kernel_fits_at_every_preset(platform):
  # Slow: every preset's model is traced (about 10 s each on 2 cores); the fast test below
  # covers the widest of these shapes.
  calls = preset_calls()
  assert {op for op, _, _ in calls.values()} == set(_RECORDED), "an op was never called"
  served, over = 0, set()
  for op, args, kwargs in calls.values():
    if op == "gated_delta_rule":
      fn, xs = _gated_delta_kernel(platform, args, kwargs)
    else:
      fn, xs = _public(op, platform, args, kwargs)
    try:
      sizes = measure(fn, xs, platform)
      served += 1
    except NotSupportedError:
      continue  # the call runs in XLA on this platform: no kernel, nothing to fit
    over |= {(platform, name) for name, b in sizes if b > LIMITS[platform]}
  assert served >= len(calls) // 2
  assert over == {k for k in KNOWN_OVER if k[0] == platform}, over


_sd = jax.ShapeDtypeStruct


def _gd_args(T, H, K, V, dtype, *, channel=False):
  B = 1
  return [
    _sd((B, T, H, K), dtype),
    _sd((B, T, H, K), dtype),
    _sd((B, T, H, V), dtype),
    _sd((B, T, H, K) if channel else (B, T, H), jnp.float32),
    _sd((B, T, H), jnp.float32),
    _sd((B, T), jnp.int32),
  ]


def _gd(platform, delta, chunk=64):
  def fn(q, k, v, g, beta, seg):
    return gd_pallas.chunk_gated_delta_rule(
      q,
      k,
      v,
      g,
      beta if delta else None,
      scale=0.1,
      initial_state=None,
      chunk_size=chunk,
      interpret=False,
      platform=platform,
      segment_ids=seg,
    )

  return fn


# The widest per-program shapes among the presets (see test_every_kernel_fits_at_every_preset):
# BASED/JRT small (K = 273 -> 512, V = 65, float32), Mamba-2 base (K = 128, bf16), gated
# DeltaNet small with per-channel decay (float32), and a float32 K = V = 128 delta rule.
_GATED_DELTA_SHAPES = {
  "based_f32": (dict(K=273, V=65, dtype=jnp.float32), False),
  "mamba2_bf16": (dict(K=128, V=64, dtype=jnp.bfloat16), False),
  "gdn_channel_f32": (dict(K=64, V=64, dtype=jnp.float32, channel=True), True),
  "delta_128_f32": (dict(K=128, V=128, dtype=jnp.float32), True),
}


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("case", sorted(_GATED_DELTA_SHAPES))
def test_gated_delta_kernels_fit(platform, case):
  shape, delta = _GATED_DELTA_SHAPES[case]
  sizes = check_footprints(_gd(platform, delta), _gd_args(256, 2, **shape), platform)
  # forward: (wy) + states + output; backward: states + state gradients + gradients
  assert len(sizes) == (6 if delta and not shape.get("channel") else 5)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_attention_and_neural_memory_kernels_fit(platform):
  # Attention at head dim 64 with grouped kv heads (transformer base), causal; the neural
  # memory at Titans small (head dim 64, memory depth 2, expansion 2, chunk 16).
  q = _sd((1, 2048, 8, 64), jnp.bfloat16)
  kv = _sd((1, 2048, 4, 64), jnp.bfloat16)
  attn = lambda q, k, v: ops.attention.dot_product_attention(
    q,
    k,
    v,
    mask=ops.attention.Mask(causal=True),
    implementation=f"pallas_{platform}",
    interpret=False,
  )
  check_footprints(attn, [q, kv, kv], platform)

  memory = jax.eval_shape(
    lambda: ops.memory.neural.init_memory(
      jax.random.PRNGKey(0), heads=8, key_dim=64, value_dim=64, hidden=128
    )
  )
  x = _sd((1, 2048, 8, 64), jnp.float32)
  gate = _sd((1, 2048, 8), jnp.float32)

  def nm(q, k, v, lr, eta, alpha, memory):
    return ops.memory.neural.neural_memory(
      q,
      k,
      v,
      lr=lr,
      momentum=eta,
      decay=alpha,
      memory=memory,
      chunk_size=16,
      implementation=f"pallas_{platform}",
      interpret=False,
    )[0]

  leaves, tree = jax.tree.flatten(memory)
  fn = lambda q, k, v, lr, eta, alpha, *w: nm(q, k, v, lr, eta, alpha, tree.unflatten(w))
  sizes = measure(fn, [x, x, x, gate, gate, gate, *leaves], platform)
  over = {(platform, n) for n, b in sizes if b > LIMITS[platform]}
  assert over == {k for k in KNOWN_OVER if k[0] == platform}, sizes


def _oversized_call(rows, cols):
  """A kernel holding one ``[rows, cols]`` float32 block in, one out."""

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0

  spec = pl.BlockSpec((rows, cols), lambda i: (i, 0))
  return lambda x: pl.pallas_call(
    kernel,
    grid=(2,),
    in_specs=[spec],
    out_specs=spec,
    out_shape=jax.ShapeDtypeStruct((2 * rows, cols), jnp.float32),
    interpret=False,
  )(x)


@pytest.mark.parametrize("platform, rows", [("gpu", 512), ("tpu", 4096)])
def test_checker_rejects_an_oversized_block(platform, rows):
  # GPU: one [512,512] f32 tile is 1 MiB loaded; TPU: [4096,512] f32 in and out, double
  # buffered, is 32 MiB + 32 MiB. An eighth of the rows fits.
  x = jax.ShapeDtypeStruct((2 * rows, 512), jnp.float32)
  with pytest.raises(AssertionError, match="over"):
    check_footprints(_oversized_call(rows, 512), [x], platform, backward=False)
  small = rows // 8
  sizes = check_footprints(_oversized_call(small, 512), [x], platform, backward=False)
  assert max(b for _, b in sizes) <= LIMITS[platform]


def test_checker_rejects_whole_state_gated_delta_tiles_on_gpu(monkeypatch):
  # BASED widths in float32 with chunk 64 and one [512, 128] state per program (the tiles
  # before the hardware table) are over; the table's tiles fit.
  args = _gd_args(256, 2, K=273, V=65, dtype=jnp.float32)
  check_footprints(_gd("gpu", False), args, "gpu")
  monkeypatch.setattr(gd_pallas, "_tiles", lambda p, K, V, chunk, bv, **kw: (chunk, V))
  with pytest.raises(AssertionError, match="over"):
    check_footprints(_gd("gpu", False), args, "gpu")


@pytest.mark.parametrize(
  "head_dim, dtype",
  [(d, jnp.bfloat16) for d in sorted(attn_gpu.BLOCKS_BY_HEAD_DIM)] + [(64, jnp.float32)],
)
def test_attention_gpu_table_fits_and_is_used(head_dim, dtype):
  # Each row of the per-head-dim table, at a length with full blocks, GQA and a causal mask:
  # every kernel fits, and each runs with its own (warps, stages) from the table. float32
  # (the small presets) takes the row of twice the head dim.
  q = _sd((1, 1024, 4, head_dim), dtype)
  kv = _sd((1, 1024, 2, head_dim), dtype)
  attn = lambda q, k, v: ops.attention.dot_product_attention(
    q, k, v, mask=ops.attention.Mask(causal=True), implementation="pallas_gpu", interpret=False
  )
  check_footprints(attn, [q, kv, kv], "gpu")
  jaxpr = jax.make_jaxpr(jax.grad(lambda *xs: jnp.sum(attn(*xs).astype(jnp.float32))))(q, kv, kv)
  params = {e.params["name"]: e.params["compiler_params"] for e in pallas_calls(jaxpr.jaxpr)}
  launch = {name: (p.num_warps, p.num_stages) for name, p in params.items()}
  row = head_dim * jnp.dtype(dtype).itemsize // 2
  want = dict(zip(("fwd", "dq", "dkv"), attn_gpu.LAUNCH_BY_HEAD_DIM[row], strict=True))
  assert launch == {f"flash_attention_{k}": v for k, v in want.items()}
