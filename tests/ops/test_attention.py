"""Conformance of ops.attention implementations against the dense reference.

``AttentionConformance`` holds the cases; each implementation subclasses it and sets ``call``.
Cases cover masks (causal, none, sinks+window, prefix, per-head), GQA ratios, lengths that are
not tile multiples (including T=1), segment ids, block-sparse indices, f32 and bf16, and check
outputs, lse and gradients of q, k, v (the loss also flows through lse, so its cotangent is
tested too).
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.attention import Mask, dot_product_attention, reference, xla
from ops.attention.mask import normalize_masks
from ops.common import NotSupportedError

# (dtype) -> absolute/relative tolerances for outputs, lse and gradients vs reference.
# f32: blockwise summation order differs from dense, so a few ulps on O(1) values; grads sum
#   over T or S terms, hence 5x looser.
# bf16: the probabilities are rounded to bf16 before the P @ V matmul (as in every flash
#   kernel) and outputs/grads are stored in bf16 (8 mantissa bits: ~4e-3 relative), so 3e-2.
TOL = {
  "float32": {"out": 2e-5, "lse": 2e-5, "grad": 1e-4},
  "bfloat16": {"out": 3e-2, "lse": 2e-2, "grad": 6e-2},
}

# name -> (B, T, S, H, K, D, mask, extras); extras may ask for segments or block_indices.
CASES = {
  "causal_gqa": (2, 37, 37, 4, 2, 16, Mask(), {}),
  "decode_t1": (2, 1, 29, 4, 1, 16, Mask(), {}),
  "full_mha": (1, 20, 33, 2, 2, 8, None, {}),
  "sinks_window": (1, 45, 45, 2, 1, 16, Mask(window=7, sinks=3), {}),
  "prefix_lm": (1, 30, 30, 2, 2, 8, Mask(prefix=12), {}),
  "per_head": (1, 33, 40, 4, 2, 8, (Mask(), Mask(window=4, sinks=2)), {}),
  "per_query_head": (1, 19, 19, 4, 2, 8, (Mask(), Mask(window=3), Mask(), Mask()), {}),
  "segments": (2, 31, 31, 2, 1, 8, Mask(), {"segments": 3}),
  "window_offset": (1, 17, 40, 2, 1, 8, Mask(window=6), {"q_offset": 9}),
  "block_sparse": (2, 40, 50, 4, 2, 8, Mask(), {"sparse": (8, 16, 3)}),
  "block_sparse_window": (1, 24, 32, 2, 1, 8, Mask(window=9, sinks=1), {"sparse": (8, 8, 2)}),
  "no_visible_rows": (1, 12, 12, 2, 1, 8, Mask(), {"q_offset": -4}),
}


def make_inputs(case, dtype, seed=0):
  b, t, s, h, kh, d, mask, extras = CASES[case]
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kh, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kh, d), jnp.float32).astype(dtype)
  kw = {"mask": mask, "q_offset": extras.get("q_offset")}
  if "segments" in extras:
    n = extras["segments"]
    seg = jnp.sort(jax.random.randint(ks[3], (b, s), 0, n), axis=1).astype(jnp.int32)
    kw["segment_ids"] = (seg[:, s - t :], seg)
  if "sparse" in extras:
    bq, bk, n = extras["sparse"]
    nq, nk = -(-t // bq), -(-s // bk)
    idx = jax.random.randint(ks[4], (b, kh, nq, n), -1, nk).astype(jnp.int32)
    kw["block_indices"] = idx.at[..., 0].set(idx[..., 1])  # a duplicate entry must count once
    kw["block_size"] = (bq, bk)
  return q, k, v, kw


def normalized_kwargs(q, k, kw):
  """Public kwargs -> the internal kernel signature (as api.validate does)."""
  t, s = q.shape[1], k.shape[1]
  return {
    "masks": normalize_masks(kw.get("mask"), q.shape[2]),
    "segment_ids": kw.get("segment_ids"),
    "q_offset": s - t if kw.get("q_offset") is None else kw["q_offset"],
    "block_indices": kw.get("block_indices"),
    "block_size": kw.get("block_size", (128, 128)),
    "scale": q.shape[-1] ** -0.5,
    "interpret": True,
  }


def loss_and_grads(fn, q, k, v):
  """Value, (o, lse) and grads of a loss using both o and lse (finite lse entries only)."""

  def loss(q, k, v):
    o, lse = fn(q, k, v)
    o32 = o.astype(jnp.float32)
    finite = jnp.isfinite(lse)
    lse_term = jnp.sum(jnp.where(finite, jnp.sin(jnp.where(finite, lse, 0.0)), 0.0))
    return jnp.sum(o32 * jnp.cos(o32)) + 0.5 * lse_term, (o, lse)

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, (o, lse)), grads = grad_fn(q, k, v)
  return o, lse, grads


def assert_close(actual, expected, tol, what):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected), err_msg=what)
  finite = np.isfinite(expected)
  np.testing.assert_allclose(actual[finite], expected[finite], atol=tol, rtol=tol, err_msg=what)


# Each case compiles a forward and a backward (~5-10 s of CPU); these run in the fast set, the
# rest only with the slow tests. Together the fast ones touch every feature once.
FAST_F32 = (
  "causal_gqa",
  "decode_t1",
  "sinks_window",
  "prefix_lm",
  "per_head",
  "segments",
  "block_sparse",
  "no_visible_rows",
)
FAST_BF16 = ("causal_gqa", "block_sparse")


def _params(names, fast):
  return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


class AttentionConformance:
  """Subclass and implement ``call(q, k, v, **internal_kwargs) -> (o, lse)``."""

  dtypes = ("float32", "bfloat16")

  def call(self, q, k, v, **kw):
    raise NotImplementedError

  @pytest.mark.parametrize("case", _params(sorted(CASES), FAST_F32))
  def test_matches_reference_f32(self, case):
    self._check(case, "float32")

  @pytest.mark.parametrize(
    "case", _params(["causal_gqa", "sinks_window", "block_sparse", "decode_t1"], FAST_BF16)
  )
  def test_matches_reference_bf16(self, case):
    if "bfloat16" not in self.dtypes:
      pytest.skip("bf16 not served by this implementation")
    self._check(case, "bfloat16")

  def _check(self, case, dtype):
    q, k, v, kw = make_inputs(case, dtype)
    ikw = normalized_kwargs(q, k, kw)
    o, lse, grads = loss_and_grads(lambda q, k, v: self.call(q, k, v, **ikw), q, k, v)
    o_ref, lse_ref, grads_ref = loss_and_grads(
      lambda q, k, v: reference.attention(q, k, v, **ikw), q, k, v
    )
    tol = TOL[dtype]
    assert o.dtype == q.dtype and o.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:3]
    assert_close(o, o_ref, tol["out"], f"{case} output")
    assert_close(lse, lse_ref, tol["lse"], f"{case} lse")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
      assert g.dtype == q.dtype
      scale = float(jnp.max(jnp.abs(g_ref.astype(jnp.float32)))) + 1.0
      assert_close(g / scale, g_ref / scale, tol["grad"], f"{case} d{name}")


class TestXlaSmallTiles(AttentionConformance):
  """Tiles of 8 queries x 8 keys so every case spans many blocks, partial last blocks included."""

  def call(self, q, k, v, **kw):
    if kw["block_indices"] is not None:
      return xla.attention(q, k, v, **kw)
    return xla.attention(q, k, v, **kw, block_q=8, block_k=8)


class TestApiDefault:
  """The public entry point with its defaults (xla on CPU, one tile for these small shapes)."""

  @pytest.mark.parametrize("case", ["per_query_head", "segments", "block_sparse_window"])
  def test_matches_reference_f32(self, case):
    AttentionConformance._check(self, case, "float32")

  def call(self, q, k, v, **kw):
    return dot_product_attention(
      q,
      k,
      v,
      mask=kw["masks"],
      segment_ids=kw["segment_ids"],
      q_offset=kw["q_offset"],
      block_indices=kw["block_indices"],
      block_size=kw["block_size"],
      return_lse=True,
    )


def test_no_visible_key_gives_zero_and_minus_inf():
  q, k, v, kw = make_inputs("no_visible_rows", "float32")
  o, lse = dot_product_attention(q, k, v, **kw, return_lse=True)
  assert np.all(np.asarray(o[:, :4]) == 0.0)
  assert np.all(np.isneginf(np.asarray(lse[:, :4])))
  assert np.all(np.isfinite(np.asarray(lse[:, 4:])))


def test_default_is_xla_on_cpu_and_names_dispatch():
  q, k, v, kw = make_inputs("causal_gqa", "float32")
  o_default = dot_product_attention(q, k, v, **kw)
  o_xla = dot_product_attention(q, k, v, **kw, implementation="xla")
  o_ref = dot_product_attention(q, k, v, **kw, implementation="reference")
  np.testing.assert_array_equal(np.asarray(o_default), np.asarray(o_xla))
  assert_close(o_ref, o_xla, TOL["float32"]["out"], "reference vs xla")
  with pytest.raises(ValueError, match="unknown implementation"):
    dot_product_attention(q, k, v, implementation="cuda_magic")


def test_per_head_mask_equals_separate_calls():
  q, k, v, _ = make_inputs("per_head", "float32")
  masks = (Mask(), Mask(window=4, sinks=2))
  o = dot_product_attention(q, k, v, mask=masks)
  o0 = dot_product_attention(q[:, :, :2], k[:, :, :1], v[:, :, :1], mask=masks[0])
  o1 = dot_product_attention(q[:, :, 2:], k[:, :, 1:], v[:, :, 1:], mask=masks[1])
  assert_close(o, jnp.concatenate([o0, o1], axis=2), 1e-6, "per-head split")


def test_jit_with_traced_block_indices():
  q, k, v, kw = make_inputs("block_sparse", "float32")
  idx = kw.pop("block_indices")
  f = jax.jit(lambda q, k, v, idx: dot_product_attention(q, k, v, block_indices=idx, **kw))
  assert_close(
    f(q, k, v, idx), dot_product_attention(q, k, v, block_indices=idx, **kw), 1e-6, "jit"
  )


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda q, k, v: dict(q=q[0]), "rank 4"),
    (lambda q, k, v: dict(q=q.astype(jnp.int32)), "dtype"),
    (lambda q, k, v: dict(k=k.astype(jnp.bfloat16), v=v.astype(jnp.bfloat16)), "dtypes differ"),
    (lambda q, k, v: dict(q=q[:, :, :3]), "not divisible"),
    (lambda q, k, v: dict(v=v[:, :5]), "shapes differ"),
    (lambda q, k, v: dict(k=k[..., :4], v=v[..., :4]), "disagree"),
    (lambda q, k, v: dict(mask=(Mask(), Mask(), Mask())), "do not divide"),
    (lambda q, k, v: dict(segment_ids=(jnp.zeros((2, 5), jnp.int32),) * 2), "segment_ids"),
    (lambda q, k, v: dict(q_offset=1.5), "q_offset"),
    (
      lambda q, k, v: dict(block_indices=jnp.zeros((2, 2, 5, 1), jnp.int32), block_size=(16, 16)),
      r"\[2, 2, 3, n\]",
    ),
    (
      lambda q, k, v: dict(block_indices=jnp.full((2, 2, 3, 1), 3, jnp.int32), block_size=(16, 16)),
      r"\[-1, 3\)",
    ),
    (lambda q, k, v: dict(block_size=(0, 8)), "block_size"),
  ],
)
def test_bad_input_raises_value_error(make, match):
  q, k, v, _ = make_inputs("causal_gqa", "float32")
  args = {"q": q, "k": k, "v": v}
  args.update(make(q, k, v))
  with pytest.raises(ValueError, match=match):
    dot_product_attention(**args)


@pytest.mark.parametrize("kw", [dict(window=0), dict(window=-2), dict(sinks=-1), dict(prefix=-1)])
def test_bad_mask_raises(kw):
  with pytest.raises(ValueError, match="Mask"):
    Mask(**kw)


def test_not_supported_error_is_a_value_error():
  assert issubclass(NotSupportedError, ValueError)


def visible_spec(mask, p, j):
  """DESIGN 2.1's visibility rule written out in numpy, independently of ``Mask.visible``."""
  ok = np.ones(np.broadcast_shapes(p.shape, j.shape), bool)
  if mask.causal:
    ok &= j <= p
  if mask.window is not None:
    ok &= (p - j < mask.window) | (j < mask.sinks)
  return ok | ((p < mask.prefix) & (j < mask.prefix))


def random_mask(rng):
  causal = bool(rng.random() < 0.7)
  window = [None, 1, 2, 5, 9][rng.integers(5)]
  return Mask(
    causal=causal,
    window=window if causal else None,  # a non-causal window is refused (ops.attention.Mask)
    sinks=int(rng.integers(0, 4)),
    prefix=[0, 0, 3, 11][rng.integers(4)],
  )


def test_mask_visible_matches_spec():
  rng = np.random.default_rng(1)
  p, j = np.arange(-3, 30)[:, None], np.arange(30)[None, :]
  for _ in range(12):
    mask = random_mask(rng)
    np.testing.assert_array_equal(np.asarray(mask.visible(p, j)), visible_spec(mask, p, j))


def test_key_block_ranges_cover_every_visible_key():
  rng = np.random.default_rng(0)
  for trial in range(400):
    mask = random_mask(rng)
    s, bk = int(rng.integers(1, 30)), int(rng.integers(1, 7))
    lo = int(rng.integers(-4, 32))
    hi = lo + int(rng.integers(1, 8))
    vis = visible_spec(mask, np.arange(lo, hi)[:, None], np.arange(s)[None])
    needed = {j // bk for j in np.nonzero(vis.any(0))[0]}
    head_b, lo_b, hi_b = mask.key_block_ranges(lo, hi, s, bk)
    assert 0 <= head_b <= lo_b <= hi_b <= -(-s // bk)
    assert needed <= set(range(head_b)) | set(range(lo_b, hi_b)), (mask, lo, hi, s, bk)
    if trial % 40:
      continue
    # Traced positions give the same ranges (kernels use them with scalar prefetch).
    traced = jax.jit(lambda a, b, m=mask, s=s, bk=bk: m.key_block_ranges(a, b, s, bk))(lo, hi)
    assert tuple(int(x) for x in traced) == (head_b, lo_b, hi_b)


def test_sink_window_visits_blocks_linear_in_window():
  """Block skipping: sink+window visits O(T * window / bk) key blocks, not O(T * S / bk)."""
  t = s = 4096
  bq = bk = 64
  mask = Mask(window=256, sinks=4)
  visited = 0
  for qi in range(t // bq):
    head_b, lo_b, hi_b = xla.local_block_ranges(mask, qi * bq, (qi + 1) * bq, 0, s, bk)
    visited += int(head_b) + int(hi_b) - int(lo_b)
  per_q_block = 1 + (256 + bq) // bk  # the sink block plus the window band
  assert visited <= (t // bq) * per_q_block
  assert visited < (t // bq) * (s // bk) / 10


def test_memory_is_linear_in_sequence_length():
  """64k-token causal attention fwd+bwd compiles to temporaries far below a dense T x S."""
  t, h, d = 65536, 1, 64
  q = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)

  def loss(q, k, v):
    return jnp.sum(dot_product_attention(q, k, v, mask=Mask()))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower().compile()
  stats = compiled.memory_analysis()
  if stats is None:
    pytest.skip("memory_analysis unavailable on this backend")
  dense = t * t * 4
  assert stats.temp_size_in_bytes < dense / 100, stats.temp_size_in_bytes


@pytest.mark.slow
def test_64k_causal_runs_on_cpu():
  t, d = 65536, 64
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  q = jax.random.normal(k1, (1, t, 1, d), jnp.float32)
  kv = jax.random.normal(k2, (1, t, 1, d), jnp.float32)
  o, lse = jax.jit(lambda q, kv: dot_product_attention(q, kv, kv, mask=Mask(), return_lse=True))(
    q, kv
  )
  assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(lse)))
  # Row 0 sees only key 0: its output is v[0] exactly.
  np.testing.assert_allclose(np.asarray(o[0, 0, 0]), np.asarray(kv[0, 0, 0]), rtol=1e-6)


def test_broken_kernel_module_cannot_break_the_api(monkeypatch):
  """A kernel file failing to import only disables that implementation, with the reason."""
  real = importlib.import_module

  def fake(name, *args):
    if name == "ops.attention.pallas_gpu":
      raise ImportError("simulated broken kernel file")
    return real(name, *args)

  # The one lazy loader of every op lives in ops.common.dispatch.
  loader = importlib.import_module("ops.common.dispatch")
  monkeypatch.setattr(loader.importlib, "import_module", fake)
  q, k, v, kw = make_inputs("causal_gqa", "float32")
  with pytest.raises(NotSupportedError, match="simulated broken kernel file"):
    dot_product_attention(q, k, v, **kw, implementation="pallas_gpu")
  # A sequence of names falls back in order (what the GPU default does).
  o = dot_product_attention(q, k, v, **kw, implementation=("pallas_gpu", "xla"))
  np.testing.assert_array_equal(
    np.asarray(o), np.asarray(dot_product_attention(q, k, v, **kw, implementation="xla"))
  )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_xla_path_lowers_for_accelerators(platform):
  """The XLA path (GPU fallback, ring attention) lowers fwd+bwd for TPU and CUDA."""
  q, k, v, kw = make_inputs("sinks_window", "bfloat16")
  kw["segment_ids"] = (jnp.zeros(q.shape[:2], jnp.int32), jnp.zeros(k.shape[:2], jnp.int32))

  def loss(q, k, v):
    o = dot_product_attention(q, k, v, **kw, implementation="xla")
    return jnp.sum(o.astype(jnp.float32))

  lowered = (
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=(platform,))
  )
  assert "stablehlo.dot_general" in lowered.as_text()
