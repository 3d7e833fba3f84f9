"""Pallas gated delta rule kernels (``ops/memory/gated_delta/pallas_*``).

On CPU the kernels run in interpret mode against the step recurrence (the definition): outputs,
final states and gradients of every input. Both interpreters start fresh outputs as NaN (TPU:
``InterpretParams(uninitialized_memory="nan")``; the generic one used for the GPU kernels does so
by default), so an element a kernel forgets to write fails the comparison. Lowering for ``tpu``
and ``cuda`` at a realistic size catches what only the real compilers' front ends reject. Each
case is one ``jit`` of forward + backward compiled at XLA optimisation level 0, since compiling
the interpreted kernels dominates the run time and the level does not change the arithmetic.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from ops.common.dispatch import NotSupportedError
from ops.memory.gated_delta import (
  gated_delta_rule,
  pallas_calls,
  pallas_common,
  pallas_gpu,
  pallas_tpu,
  reference,
)

# Max abs error divided by max(1, max abs of the reference), per dtype.
TOLERANCES = {
  # Interpret mode is plain f32 arithmetic in a different order than the step recurrence.
  "float32": {"out": 1e-5, "grad": 5e-5},
  # Inputs are the same bf16 values on both sides; the error is the kernel's bf16 rounding of
  # its dot operands (states included) and of o, dq, dk, dv (8 bit mantissa: 2**-8 ~ 4e-3 of
  # the largest element per rounding).
  "bfloat16": {"out": 1e-2, "grad": 1e-2},
}

KERNELS = {"tpu": pallas_tpu.chunk_gated_delta_rule, "gpu": pallas_gpu.chunk_gated_delta_rule}
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _inputs(
  T,
  *,
  K=16,
  V=16,
  H=2,
  B=1,
  decay=True,
  channel=False,
  delta=True,
  h0=True,
  dtype=jnp.float32,
  seed=0,
):
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(keys[0], (B, T, H, K))
  k = jax.random.normal(keys[1], (B, T, H, K))
  # Unit-norm keys as in gated DeltaNet: the delta rule is a contraction only then.
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(keys[2], (B, T, H, V))
  g_shape = (B, T, H, K) if channel else (B, T, H)
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], g_shape) + 2.0) if decay else None
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (B, T, H))) if delta else None
  s = jax.random.normal(keys[5], (B, H, K, V)) if h0 else None
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta, s


def _value_and_grads(fn, args, cotangents, **kw):
  """``(o, final_state, grads of every non-None input)`` under one compiled jit."""
  present = [i for i, a in enumerate(args) if a is not None]

  def run(xs, cts):
    def f(*xs):
      full = list(args)
      for i, x in zip(present, xs):
        full[i] = x
      q, k, v, g, beta, s = full
      return fn(q, k, v, g, beta, initial_state=s, **kw)

    out, vjp = jax.vjp(f, *xs)
    return out, vjp(cts)

  xs = [args[i] for i in present]
  options = _FAST_COMPILE if jax.default_backend() == "cpu" else None
  compiled = jax.jit(run).trace(xs, cotangents).lower().compile(compiler_options=options)
  (o, state), grads = compiled(xs, cotangents)
  return o, state, dict(zip(present, grads))


def _assert_close(name, got, want, tol):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.all(np.isfinite(got)), f"{name}: non-finite values (unwritten memory?)"
  err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
  assert err <= tol, f"{name}: relative max error {err:.3g} > {tol}"


def _check_against_reference(
  platform, T, *, dtype=jnp.float32, chunk=16, block_v=None, segment_ids=None, **kw
):
  """Kernel vs the step recurrence: outputs, final state and the gradient of every input.

  Returns the reference output, so a caller can check that a feature changes it.
  """
  B = 1 if segment_ids is None else segment_ids.shape[0]
  args = _inputs(T, dtype=dtype, B=B, **kw)
  q, _, v, _, _, _ = args
  B, _, H, K = q.shape
  V = v.shape[-1]
  cts = (
    jax.random.normal(jax.random.PRNGKey(7), v.shape).astype(v.dtype),
    jax.random.normal(jax.random.PRNGKey(8), (B, H, K, V)),
  )
  common = {"scale": K**-0.5, "chunk_size": chunk}
  if segment_ids is not None:
    common["segment_ids"] = segment_ids
  o, state, grads = _value_and_grads(
    KERNELS[platform], args, cts, interpret=True, block_v=block_v, **common
  )
  # The definition, in f32 on the same (possibly bf16-rounded) inputs.
  up = tuple(None if a is None else a.astype(jnp.float32) for a in args)
  up_cts = tuple(c.astype(jnp.float32) for c in cts)
  o_ref, state_ref, grads_ref = _value_and_grads(
    reference.recurrent_gated_delta_rule, up, up_cts, **common
  )
  tol = TOLERANCES[jnp.dtype(dtype).name]
  assert o.dtype == v.dtype and state.dtype == jnp.float32
  _assert_close("o", o, o_ref, tol["out"])
  _assert_close("final_state", state, state_ref, tol["out"])
  names = ("dq", "dk", "dv", "dg", "dbeta", "dinitial_state")
  assert grads.keys() == grads_ref.keys()
  for i, got in grads.items():
    assert got.dtype == args[i].dtype, (names[i], got.dtype)
    _assert_close(names[i], got, grads_ref[i], tol["grad"])
  return o_ref


def _packed(*rows):
  """``[B,T]`` segment ids from per-row document lengths (ids need not start at 0)."""
  ids = [np.repeat(np.arange(len(r)) + 3 * b, r) for b, r in enumerate(rows)]
  return jnp.asarray(np.stack(ids), jnp.int32)


# Two rows of 3 packed documents, T = 40 (not a multiple of 16); boundaries at 11, 31 and 5, 21:
# none at a chunk multiple, and row 1's second document spans a whole chunk boundary.
_SEGMENTS = _packed((11, 20, 9), (5, 16, 19))


def _check_segments(platform, **kw):
  o_ref = _check_against_reference(platform, 40, segment_ids=_SEGMENTS, **kw)
  # The reference without segments differs: the resets are what the comparison above checks.
  up = _inputs(40, B=2, **{k: x for k, x in kw.items() if k not in ("chunk", "block_v")})
  K = up[0].shape[-1]
  o_joined, _ = reference.recurrent_gated_delta_rule(*up[:5], scale=K**-0.5, initial_state=up[5])
  assert np.max(np.abs(np.asarray(o_joined) - np.asarray(o_ref))) > 0.1


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_segments_delta_rule(platform):
  # Gated DeltaNet packed training: scalar decay, delta rule, an initial state for segment 0.
  _check_segments(platform)


@pytest.mark.parametrize("platform, chunk", [("gpu", 4), ("tpu", 8)])
def test_segments_additive_small_chunk(platform, chunk):
  # Linear attention / Mamba-2 with a chunk below the 16-row tile: the kernels run at 16.
  _check_segments(platform, chunk=chunk, delta=False, h0=False)


@pytest.mark.parametrize("platform", ["tpu", pytest.param("gpu", marks=pytest.mark.slow)])
def test_segments_per_channel_decay(platform):
  # GLA-style decay: the masks also enter P and the WY matrices built in XLA.
  _check_segments(platform, channel=True)


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_segments_value_blocks_additive_per_channel(platform):
  _check_segments(platform, V=32, block_v=16, channel=True, delta=False)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_delta_rule_with_decay_and_initial_state(platform):
  # T = 40 is not a chunk multiple: the padded tail must leave the state unchanged.
  _check_against_reference(platform, 40)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_additive_with_decay_value_blocks(platform):
  # Linear attention / RetNet / Mamba-2 form; two value blocks in the sequential kernels.
  _check_against_reference(platform, 64, V=32, delta=False, h0=False, block_v=16)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_delta_rule_bf16_single_token_no_decay(platform):
  # T = 1: one chunk holding one real token; DeltaNet (no decay).
  _check_against_reference(platform, 1, dtype=jnp.bfloat16, decay=False, h0=False)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_delta_rule_per_channel_decay(platform):
  # Gated DeltaNet with GLA-style decay: P and the WY matrices come from XLA, the rest kernels.
  _check_against_reference(platform, 40, channel=True)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("channel", [False, True], ids=["scalar_decay", "channel_decay"])
def test_odd_head_widths_are_padded(platform, channel):
  # K = 12, V = 17 fit no tile: the wrapper zero-pads them to 16 and 32 (q, k, v, per-channel
  # g and the initial state) and slices o, the final state and every gradient back.
  _check_against_reference(platform, 20, K=12, V=17, H=1, channel=channel)


@pytest.mark.parametrize(
  "platform, n, want",
  [
    ("gpu", 1, 16),
    ("gpu", 16, 16),
    ("gpu", 17, 32),
    ("gpu", 65, 128),
    ("gpu", 273, 512),
    ("tpu", 12, 16),
    ("tpu", 64, 64),
    ("tpu", 65, 128),
    ("tpu", 128, 128),
    ("tpu", 273, 384),
  ],
)
def test_padded_width(platform, n, want):
  # GPU: powers of two >= 16 (Triton). TPU: the same up to 128 lanes, then multiples of 128.
  assert pallas_common.padded_width(platform, n) == want


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_additive_per_channel_decay(platform, dtype):
  # GLA.
  _check_against_reference(platform, 64, K=32, V=32, dtype=dtype, channel=True, delta=False)


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("delta", [True, False])
def test_wider_heads_several_chunks(platform, dtype, delta):
  _check_against_reference(platform, 64, K=32, V=32, dtype=dtype, delta=delta, block_v=16)


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_delta_rule_chunk_32_long(platform):
  _check_against_reference(platform, 100, chunk=32, K=16, V=32)


def test_through_the_public_op():
  # api.py pads T and dispatches by name.
  q, k, v, g, beta, s = _inputs(24, channel=True)
  kw = {"beta": beta, "initial_state": s, "output_final_state": True, "chunk_size": 16}
  o, state = gated_delta_rule(q, k, v, g=g, implementation="pallas_gpu", interpret=True, **kw)
  o_ref, state_ref = gated_delta_rule(q, k, v, g=g, implementation="reference", **kw)
  _assert_close("o", o, o_ref, TOLERANCES["float32"]["out"])
  _assert_close("final_state", state, state_ref, TOLERANCES["float32"]["out"])


def test_interpreters_poison_fresh_memory():
  # The NaN fill is what makes every comparison above a check that each output is written.
  assert pallas_calls._interpret(dataclasses.replace(_TPU_CFG, platform="gpu")) is True
  assert np.all(np.isnan(np.asarray(_unwritten_output())))
  assert pallas_calls._interpret(_TPU_CFG).uninitialized_memory == "nan"


_TPU_CFG = pallas_calls.Config(
  platform="tpu", scale=1.0, chunk=16, delta=True, block_v=16, interpret=True
)


def _unwritten_output():
  """A generic-interpreter kernel that never writes its output."""
  return pl.pallas_call(
    lambda x_ref, o_ref: None, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), interpret=True
  )(jnp.zeros((8, 128), jnp.float32))


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_rejects_unsupported_and_bad_inputs(platform):
  q, k, v, g, beta, s = _inputs(16)
  kw = {"scale": 0.25, "initial_state": s, "chunk_size": 16, "interpret": True}
  with pytest.raises(ValueError, match="g must be"):
    KERNELS[platform](q, k, v, g[..., :1], beta, **kw)
  with pytest.raises(ValueError, match="beta"):
    KERNELS[platform](q, k, v, g, beta[:, :, :1], **kw)
  with pytest.raises(ValueError, match="initial_state"):
    KERNELS[platform](q, k, v, g, beta, **{**kw, "initial_state": s[..., :8]})
  with pytest.raises(ValueError, match="block_v"):
    KERNELS[platform](q, k, v, g, beta, block_v=24, **kw)
  with pytest.raises(NotSupportedError, match="chunk size" if platform == "tpu" else "powers"):
    KERNELS[platform](q, k, v, g, beta, **{**kw, "chunk_size": 24})
  with pytest.raises(ValueError, match="segment_ids"):
    KERNELS[platform](q, k, v, g, beta, segment_ids=jnp.zeros((1, 8), jnp.int32), **kw)


# Lowering at a realistic size: bf16, T=1024, H=4, K=V=128, chunk 64.
_KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": r"__gpu\$xla\.gpu\.triton"}
# pallas_calls per direction: forward = wy + states + output (additive: no wy); backward =
# states recomputed + state gradients + per-chunk gradients (the WY backward is XLA).
_EXPECTED_CALLS = {("fwd", True): 3, ("fwd", False): 2, ("bwd", True): 3, ("bwd", False): 3}


def _lowered_kernel_calls(
  lowering_platform,
  delta,
  direction,
  *,
  T=1024,
  H=4,
  K=128,
  V=128,
  channel=False,
  segments=False,
  chunk=64,
  dtype=jnp.bfloat16,
):
  B = 1
  f32 = jnp.float32
  shapes = (
    jax.ShapeDtypeStruct((B, T, H, K), dtype),
    jax.ShapeDtypeStruct((B, T, H, K), dtype),
    jax.ShapeDtypeStruct((B, T, H, V), dtype),
    jax.ShapeDtypeStruct((B, T, H, K) if channel else (B, T, H), f32),
    jax.ShapeDtypeStruct((B, T, H), f32),
    jax.ShapeDtypeStruct((B, H, K, V), f32),
  )
  # Segment ids are a traced input, as in training.
  shapes += (jax.ShapeDtypeStruct((B, T), jnp.int32),) if segments else ()
  kernel = KERNELS["tpu" if lowering_platform == "tpu" else "gpu"]

  def fwd(q, k, v, g, beta, s, seg=None):
    return kernel(
      q,
      k,
      v,
      g,
      beta if delta else None,
      scale=K**-0.5,
      initial_state=s,
      chunk_size=chunk,
      interpret=False,
      segment_ids=seg,
    )

  def loss(*args):
    o, state = fwd(*args)
    return jnp.sum(o.astype(f32) ** 2) + jnp.sum(state**2)

  argnums = (0, 1, 2, 3, 4, 5) if delta else (0, 1, 2, 3, 5)
  f = fwd if direction == "fwd" else jax.grad(loss, argnums=argnums)
  text = jax.jit(f).trace(*shapes).lower(lowering_platforms=(lowering_platform,)).as_text()
  return len(re.findall(_KERNEL_CALL[lowering_platform], text))


def _expected_calls(delta, direction, channel=False):
  # Per-channel decay has no wy kernel (its within-chunk matrices come from XLA).
  fwd = _EXPECTED_CALLS[("fwd", delta)] - (1 if channel and delta else 0)
  return fwd if direction == "fwd" else fwd + _EXPECTED_CALLS[("bwd", delta)]


@pytest.mark.parametrize("lowering_platform", ["tpu", "cuda"])
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "additive"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_lowers(lowering_platform, delta, direction):
  calls = _lowered_kernel_calls(lowering_platform, delta, direction)
  assert calls == _expected_calls(delta, direction)


@pytest.mark.parametrize("lowering_platform", ["tpu", "cuda"])
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "additive"])
def test_lowers_per_channel_decay(lowering_platform, delta):
  calls = _lowered_kernel_calls(lowering_platform, delta, "bwd", channel=True)
  assert calls == _expected_calls(delta, "bwd", channel=True)


@pytest.mark.parametrize("lowering_platform", ["tpu", "cuda"])
@pytest.mark.parametrize("K, V", [(64, 64), (128, 256)])
def test_lowers_other_head_dims(lowering_platform, K, V):
  # K = V = 64 (a lane-narrow tile on TPU), V = 256 (several value blocks), a ragged T.
  calls = _lowered_kernel_calls(lowering_platform, True, "bwd", T=1000, H=2, K=K, V=V)
  assert calls == _expected_calls(True, "bwd")


@pytest.mark.parametrize("lowering_platform", ["tpu", "cuda"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_lowers_based_widths(lowering_platform, direction):
  # BASED / JRT: Taylor features of 16 dims (K = 1 + 16 + 256 = 273) and a value column of
  # ones for the normaliser (V = 64 + 1), both padded inside the wrapper.
  calls = _lowered_kernel_calls(lowering_platform, False, direction, T=512, H=2, K=273, V=65)
  assert calls == _expected_calls(False, direction)


@pytest.mark.parametrize("lowering_platform", ["tpu", "cuda"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("channel", [False, True], ids=["scalar_decay", "channel_decay"])
def test_lowers_with_segments(lowering_platform, direction, channel):
  # Packed segments (a traced [B,T] input) and chunk 8, which the kernels run as 16.
  calls = _lowered_kernel_calls(
    lowering_platform, True, direction, T=1000, segments=True, chunk=8, channel=channel
  )
  assert calls == _expected_calls(True, direction, channel=channel)


@pytest.mark.parametrize("lowering_platform", ["tpu", "cuda"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_lowers_based_widths_with_segments_float32_tiles(lowering_platform, direction):
  # BASED small: K = 273 -> 512, V = 65, additive, float32, packed; the GPU tile table takes
  # chunk 16 and value blocks of 16 here (several value blocks in every kernel).
  calls = _lowered_kernel_calls(
    lowering_platform, False, direction, T=512, H=2, K=273, V=65, segments=True, dtype=jnp.float32
  )
  assert calls == _expected_calls(False, direction)


@pytest.mark.parametrize("lowering_platform", ["tpu", "cuda"])
def test_lowers_delta_rule_odd_value_width(lowering_platform):
  calls = _lowered_kernel_calls(lowering_platform, True, "bwd", T=512, H=2, K=64, V=65)
  assert calls == _expected_calls(True, "bwd")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_compiled_on_gpu():
  _check_on_device("gpu")


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
def test_compiled_on_tpu():
  _check_on_device("tpu")


def _check_on_device(platform):
  """Compiled kernels vs the f32 reference at a realistic size, forward and backward.

  Loose tolerance: on device the kernels' f32 matmuls may run as TF32 (GPU) or bf16 passes (TPU).
  """
  args = _inputs(256, K=64, V=64, H=2)
  cts = (jax.random.normal(jax.random.PRNGKey(7), args[2].shape), jnp.ones((1, 2, 64, 64)))
  kw = {"scale": 0.125, "chunk_size": 64}
  o, state, grads = _value_and_grads(KERNELS[platform], args, cts, interpret=False, **kw)
  with jax.default_matmul_precision("highest"):
    o_ref, state_ref, grads_ref = _value_and_grads(
      reference.recurrent_gated_delta_rule, args, cts, **kw
    )
  _assert_close("o", o, o_ref, 2e-2)
  _assert_close("final_state", state, state_ref, 2e-2)
  for i, got in grads.items():
    _assert_close(f"grad {i}", got, grads_ref[i], 5e-2)


def _kernel_dot_operand_dtypes(dtype, platform):
  """Dtypes of the operands of every dot inside the kernels (forward and backward)."""
  args = _inputs(32, dtype=dtype)

  def loss(q, k, v, g, beta, s):
    o, state = KERNELS[platform](
      q, k, v, g, beta, scale=0.25, initial_state=s, chunk_size=16, interpret=False
    )
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args)
  found = set()

  def walk(j, inside):
    for e in j.eqns:
      if inside and e.primitive.name == "dot_general":
        found.update(jnp.dtype(v.aval.dtype).name for v in e.invars)
      for p in e.params.values():
        for sub in p if isinstance(p, (list, tuple)) else (p,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            walk(sub, inside or e.primitive.name == "pallas_call")

  walk(jaxpr.jaxpr, False)
  return found


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_precision_policy_dot_operands(platform):
  # bf16 inputs: every in-kernel dot takes bf16 operands (float32 accumulation); the bf16
  # comparisons above hold at the bf16 tolerance with them. float32 inputs stay float32.
  assert _kernel_dot_operand_dtypes(jnp.bfloat16, platform) == {"bfloat16"}
  assert _kernel_dot_operand_dtypes(jnp.float32, platform) == {"float32"}
