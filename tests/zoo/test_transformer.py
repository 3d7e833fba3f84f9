"""The Llama-style baseline: causality, decode == forward, packed documents, registry."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.zoo.helpers import decode_all, forward_fn, step_fn
from zoo.layers.rope import RopeScaling
from zoo.streaming.model import from_transformer as streaming_from_transformer

# Float32 model; differences come only from summation order (blockwise vs dense attention).
ATOL = 2e-4


def tiny(**kw):
  return zoo.config("transformer", "tiny", d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, **kw)


def tokens(key, b, t):
  return jax.random.randint(jax.random.key(key), (b, t), 0, 260)


def test_presets_build_and_count():
  for preset in ("tiny", "small", "base"):
    cfg = zoo.config("transformer", preset)
    abstract = nnx.eval_shape(lambda c=cfg: zoo.build(c, rngs=0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n > 0
  with pytest.raises(ValueError, match="did you mean 'd_model'"):
    zoo.config("transformer", "tiny", d_modle=3)
  with pytest.raises(ValueError, match="unknown model"):
    zoo.config("transformr")


def test_params_carry_logical_axes():
  model = zoo.build(tiny(), rngs=0)
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert leaves and all(len(s) >= 1 for s in leaves)
  assert model.blocks[0].attn.wq.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")


@pytest.mark.parametrize("window, conv", [(None, 0), (5, 0), (None, 3)])
def test_causal(window, conv):
  cfg = tiny(window=window, sinks=2 if window else 0, conv_width=conv)
  f = forward_fn(zoo.build(cfg, rngs=0))
  x = tokens(0, 2, 24)
  y = x.at[:, 13].set((x[:, 13] + 1) % 260)
  a, b = f(x), f(y)
  np.testing.assert_allclose(a[:, :13], b[:, :13], atol=1e-6)
  assert np.abs(np.asarray(a[:, 13:] - b[:, 13:])).max() > 1e-4


@pytest.mark.parametrize(
  "cfg_kw",
  [
    {},
    {"window": 6, "sinks": 2},
    {"tie_embeddings": False},
    {"conv_width": 3},
    {"conv_width": 4, "window": 6, "sinks": 2},
    {"qkv_bias": True, "out_bias": True, "qk_norm": True, "window": 6, "window_layers": (1,)},
  ],
)
def test_decode_matches_forward(cfg_kw):
  model = zoo.build(tiny(**cfg_kw), rngs=1)
  x = tokens(1, 2, 20)
  full = forward_fn(model)(x)
  # Prefill a chunk, then one token at a time.
  stepped, state = decode_all(model, x, 32, prefill=7)
  np.testing.assert_allclose(stepped, full, atol=ATOL)
  assert state["lengths"].tolist() == [20, 20]


@pytest.mark.parametrize("conv", [0, 3])
def test_decode_per_sequence_lengths(conv):
  model = zoo.build(tiny(conv_width=conv), rngs=2)
  step, f = step_fn(model), forward_fn(model)
  x = tokens(2, 2, 12)
  # Sequence 0 gets 5 prompt tokens, sequence 1 gets 9: prefill them separately, then step.
  _, s0 = step(x[:1, :5], model.init_state(1, 16))
  _, s1 = step(x[1:, :9], model.init_state(1, 16))
  state = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), s0, s1)
  nxt = jnp.stack([x[0, 5], x[1, 9]])[:, None]
  logits, _ = step(nxt, state)
  ref0, ref1 = f(x[:1, :6]), f(x[1:, :10])
  np.testing.assert_allclose(logits[0, 0], ref0[0, -1], atol=ATOL)
  np.testing.assert_allclose(logits[1, 0], ref1[0, -1], atol=ATOL)


@pytest.mark.parametrize("conv", [0, 3])
def test_packed_documents_do_not_interact(conv):
  f = forward_fn(zoo.build(tiny(conv_width=conv), rngs=3))
  a, b = tokens(3, 1, 9), tokens(4, 1, 7)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.concatenate([jnp.ones((1, 9), jnp.int32), 2 * jnp.ones((1, 7), jnp.int32)], axis=1)
  out = f(packed, seg)
  ra, rb = f(a), f(b)
  np.testing.assert_allclose(out[:, :9], ra, atol=ATOL)
  np.testing.assert_allclose(out[:, 9:], rb, atol=ATOL)


def test_primer_convolution_follows_its_definition():
  """conv_width=w: q, k, v of every head are causal depthwise convolutions of the projections,
  ``y_t = sum_j w_j x_{t-w+1+j}`` (zeros before the start), taken before RoPE."""
  model = zoo.build(tiny(conv_width=3, n_layers=1), rngs=7)
  attn = model.blocks[0].attn
  x = jax.random.normal(jax.random.key(8), (2, 11, 64))
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
  q, k, v, _ = attn.convolved_qkv(x, pos, 11)
  raw = dict(zip("qkv", attn._linear(x)))
  for name, got in (("q", q), ("k", k), ("v", v)):
    w = np.asarray(attn.conv[name].weight[...])  # [width, heads, Dh]
    r = np.pad(np.asarray(raw[name]), ((0, 0), (2, 0), (0, 0), (0, 0)))
    want = sum(w[j] * r[:, j : j + 11] for j in range(3))
    if name != "v":  # q and k are rotated after the convolution
      want = np.asarray(attn.rotate(jnp.asarray(want), pos, 11))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_primer_backbone_is_refused_by_raw_projection_memories():
  model = zoo.build(tiny(conv_width=3), rngs=0)
  with pytest.raises(ValueError, match="conv_width"):
    model.blocks[0].attn.project(jnp.zeros((1, 4, 64)))
  streaming = streaming_from_transformer(model, sinks=2, window=4)
  with pytest.raises(ValueError, match="conv_width=3"):
    streaming(tokens(0, 1, 8))


def test_gradients_finite_and_nonzero():
  model = zoo.build(tiny(), rngs=4)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = tokens(5, 2, 16)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(x)
    return jnp.mean(
      jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0]
    )

  grads = jax.jit(jax.grad(loss))(params)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_bfloat16_compute_close_to_float32():
  cfg = tiny()
  m32 = zoo.build(cfg, rngs=5)
  m16 = zoo.build(dataclasses.replace(cfg, dtype="bfloat16"), rngs=5)
  x = tokens(6, 2, 16)
  a, b = forward_fn(m32)(x), forward_fn(m16)(x)
  assert b.dtype == jnp.float32
  # bf16 activations carry ~3 significant digits; logits of this tiny model are O(1).
  np.testing.assert_allclose(a, b, atol=0.1)


@pytest.mark.parametrize(
  "scaling",
  [
    RopeScaling(kind="linear", factor=2.0),
    RopeScaling(kind="ntk", factor=2.0),
    RopeScaling(kind="yarn", factor=2.0, original_max_len=16),
    RopeScaling(kind="abf", base=500000.0),
    RopeScaling(kind="truncated", original_max_len=16),
    RopeScaling(kind="llama3", factor=8.0, original_max_len=16),
    # Length-dependent variants: within their training length decode equals the forward.
    RopeScaling(kind="dynamic_ntk", factor=2.0, original_max_len=16),
    RopeScaling(
      kind="longrope",
      factor=2.0,
      original_max_len=16,
      short_factor=(1.5,) * 8,
      long_factor=(3.0,) * 8,
    ),
  ],
)
def test_rope_scaling_variants_decode_consistently(scaling):
  model = zoo.build(tiny(rope_scaling=scaling, n_layers=1), rngs=6)
  x = tokens(7, 1, 12)
  full = forward_fn(model)(x)
  logits, _ = step_fn(model)(x, model.init_state(1, 12))
  np.testing.assert_allclose(logits, full, atol=ATOL)


def test_windows_apply_only_to_the_listed_layers():
  x = tokens(8, 1, 16)
  full = forward_fn(zoo.build(tiny(), rngs=2))(x)
  both = forward_fn(zoo.build(tiny(window=4), rngs=2))(x)
  second = forward_fn(zoo.build(tiny(window=4, window_layers=(1,)), rngs=2))(x)
  # Within the window all three agree; beyond it one windowed layer differs from none and
  # from two, so the layer list is honoured rather than ignored or applied to every layer.
  np.testing.assert_allclose(second[:, :4], full[:, :4], atol=ATOL)
  assert np.abs(np.asarray(second - full)[:, 8:]).max() > 1e-3
  assert np.abs(np.asarray(second - both)[:, 8:]).max() > 1e-3


def test_bias_and_qk_norm_change_the_output_and_decode_with_them():
  cfg = tiny(qkv_bias=True, out_bias=True, qk_norm=True, n_layers=1)
  model = zoo.build(cfg, rngs=3)
  x = tokens(9, 2, 12)
  before = forward_fn(model)(x)
  attn = model.blocks[0].attn
  for v in (attn.bias["q"], attn.bias["k"], attn.bias["v"], attn.out_bias, attn.q_norm.scale):
    v[...] = v[...] + 0.5 * jax.random.normal(jax.random.key(1), v[...].shape)
  after = forward_fn(model)(x)
  assert np.abs(np.asarray(after - before)).max() > 1e-3
  stepped, _ = decode_all(model, x, 16, prefill=5)
  np.testing.assert_allclose(stepped, after, atol=ATOL)


def test_param_dtype_stores_parameters_rounded():
  f32 = zoo.build(tiny(), rngs=4)
  bf16 = zoo.build(tiny(param_dtype="bfloat16"), rngs=4)
  a = nnx.state(f32, nnx.Param)
  b = nnx.state(bf16, nnx.Param)
  for (path, va), (_, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
    assert vb[...].dtype == jnp.bfloat16, path
    np.testing.assert_array_equal(vb[...], va[...].astype(jnp.bfloat16))
