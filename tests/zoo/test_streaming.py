"""StreamingLLM: decode == forward past the cache, constant memory, position shift, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import zoo
from zoo.streaming import from_transformer

# Float32 everywhere; differences come from summation order and lse merging only.
ATOL = 2e-4
# Position-shift reference recomputes RoPE at different (but equal-distance) angles.
ATOL_SHIFT = 5e-4


def backbone(**kw):
  small = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2}
  return zoo.config("transformer", "tiny", **{**small, **kw})


def streaming(**kw):
  return zoo.config("streaming", "tiny", **{"backbone": backbone(), "sinks": 2, "window": 5, **kw})


def tokens(seed, b, t):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 260)


def forward(model, x):
  return jitted(model)[0](x)


def jitted(model):
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  step = jax.jit(lambda s, x, st: nnx.merge(graphdef, s).step(x, st))
  return (lambda x: fwd(state, x)), (lambda x, st: step(state, x, st)), step


def decode(model, x, prefill):
  _, step, _ = jitted(model)
  state = model.init_state(x.shape[0])
  logits, state = step(x[:, :prefill], state)
  outs = [logits]
  for t in range(prefill, x.shape[1]):
    logits, state = step(x[:, t : t + 1], state)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), state


@pytest.mark.parametrize(
  "kw",
  [
    {"shift": True, "learnable_sink": True},
    {"shift": False},
    {"sinks": 0},
  ],
)
def test_decode_matches_forward_beyond_cache(kw):
  # 23 tokens through a 7-entry cache: the forward computes the same shifted attention.
  model = zoo.build(streaming(**kw), rngs=1)
  x = tokens(1, 2, 23)
  fwd, _, _ = jitted(model)
  full = fwd(x)
  got, state = decode(model, x, prefill=9)
  np.testing.assert_allclose(got, full, atol=ATOL)
  extra = 1 if kw.get("learnable_sink") else 0
  assert state["lengths"].tolist() == [23 + extra] * 2


def test_position_shift_matches_recomputing_the_cache():
  # One layer: the newest query's output equals the transformer run on just the cached tokens
  # (sinks then window, renumbered 0..s+w-1), which is what position shift means.
  cfg = streaming(backbone=backbone(n_layers=1), sinks=2, window=5)
  model = zoo.build(cfg, rngs=2)
  x = tokens(2, 1, 20)
  full = forward(model, x)
  ps = (6, 12, 19)
  kept = jnp.concatenate([jnp.concatenate([x[:, :2], x[:, p - 4 : p + 1]], axis=1) for p in ps])
  ref = forward(model.backbone, kept)
  for i, p in enumerate(ps):
    np.testing.assert_allclose(full[0, p], ref[i, -1], atol=ATOL_SHIFT)


def test_constant_memory_over_long_stream():
  model = zoo.build(streaming(), rngs=3)
  _, step, raw = jitted(model)
  state = model.init_state(1)
  sizes = [x.shape for x in jax.tree.leaves(state)]
  x = tokens(3, 1, 60)  # more than 8x the 7-entry cache
  for t in range(60):
    logits, state = step(x[:, t : t + 1], state)
    assert np.isfinite(np.asarray(logits)).all()
  assert [x.shape for x in jax.tree.leaves(state)] == sizes
  assert raw._cache_size() == 1  # one compiled step served the whole stream


def test_equals_checkpointed_transformer_while_context_fits(tmp_path):
  # A transformer's parameters go through an Orbax checkpoint, then into StreamingLLM unchanged.
  source = zoo.build(backbone(), rngs=4)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "params", nnx.state(source, nnx.Param))
  ckpt.wait_until_finished()
  fresh = zoo.build(backbone(), rngs=99)
  restored = ckpt.restore(tmp_path / "params", nnx.state(fresh, nnx.Param))
  nnx.update(fresh, restored)
  model = from_transformer(fresh, sinks=2, window=16)
  x = tokens(4, 2, 18)
  ref = forward(source, x)
  out = forward(model, x)
  np.testing.assert_allclose(out, ref, atol=ATOL)
  got, _ = decode(model, x, prefill=5)
  np.testing.assert_allclose(got, ref, atol=ATOL)


def test_causal_and_gradients():
  model = zoo.build(streaming(learnable_sink=True), rngs=5)
  x = tokens(5, 2, 16)
  y = x.at[:, 9].set((x[:, 9] + 1) % 260)
  both = forward(model, jnp.concatenate([x, y]))
  a, b = both[:2], both[2:]
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
  assert np.abs(np.asarray(a[:, 9:] - b[:, 9:])).max() > 1e-4

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(x)
    return jnp.mean(
      jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0]
    )

  grads = jax.jit(jax.grad(loss))(params)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  assert np.abs(np.asarray(grads["sink_embed"].value)).max() > 0


def test_bad_config_names_field():
  with pytest.raises(ValueError, match="window"):
    streaming(window=0)
  with pytest.raises(ValueError, match="sinks"):
    streaming(sinks=-1)
  with pytest.raises(ValueError, match="vocab_size"):
    streaming(vocab_size=100)


@pytest.mark.slow
def test_trains_on_mqar_beyond_chance():
  from pipelines.tasks import MQAR
  from pipelines.tasks.training import Budget, train_on_task

  cfg = zoo.config("streaming", "tiny", backbone=backbone(d_model=64), sinks=4, window=60)
  train = MQAR(length=64, num_pairs=4, token_range=(0, 64), seed=0)
  evals = MQAR(length=64, num_pairs=4, token_range=(0, 64), seed=1)
  out = train_on_task(
    cfg, train, evals, Budget(steps=200, batch_size=16, lr=3e-3, eval_examples=64)
  )
  assert out["accuracy"] > 3 * out["chance"]


def test_packed_documents_do_not_interact_window_only():
  model = zoo.build(streaming(sinks=0, window=6), rngs=6)
  a, b = tokens(6, 1, 9), tokens(7, 1, 7)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.concatenate([jnp.ones((1, 9), jnp.int32), 2 * jnp.ones((1, 7), jnp.int32)], axis=1)
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda x, s: nnx.merge(graphdef, state)(x, segment_ids=s)[0])
  out = run(packed, seg)
  ref = run(jnp.concatenate([a, jnp.zeros_like(b)], axis=1), jnp.ones_like(seg))
  np.testing.assert_allclose(out[:, :9], ref[:, :9], atol=ATOL)
  ref_b = run(jnp.concatenate([b, jnp.zeros_like(a)], axis=1), jnp.ones_like(seg))
  np.testing.assert_allclose(out[:, 9:], ref_b[:, :7], atol=ATOL)
