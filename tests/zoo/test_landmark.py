"""Landmark attention: decode == forward, top-k over all blocks == dense grouped softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo.landmark import grouped_attention

# Float32 everywhere; differences come from summation order and lse merging only.
ATOL = 2e-4


def landmark(**kw):
  small = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2, "max_len": 64}
  bb = zoo.config("transformer", "tiny", **small)
  return zoo.config("landmark", "tiny", **{"backbone": bb, "block_size": 4, **kw})


def tokens(seed, b, t):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 260)


def jitted(model):
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  step = jax.jit(lambda s, x, st: nnx.merge(graphdef, s).step(x, st))
  return (lambda x: fwd(state, x)), (lambda x, st: step(state, x, st))


def test_grouped_softmax_definition():
  # Against the paper's formula written out per query for one head.
  bs, n = 3, 9
  q = jax.random.normal(jax.random.key(0), (1, n, 1, 4))
  k = jax.random.normal(jax.random.key(1), (1, n, 1, 4))
  v = jax.random.normal(jax.random.key(2), (1, n, 1, 4))
  o = np.asarray(grouped_attention(q, k, v, bs))[0, :, 0]
  q, k, v = (np.asarray(a)[0, :, 0] for a in (q, k, v))
  for i in range(n):
    c = i // bs
    own = [j for j in range(c * bs, i + 1)]
    lms = [m * bs + bs - 1 for m in range(c)]
    logits = np.array([q[i] @ k[j] for j in own + lms]) / 2.0
    p = np.exp(logits - logits.max())
    p /= p.sum()
    want = sum(p[a] * v[j] for a, j in enumerate(own))
    for m, pl in zip(range(c), p[len(own) :]):
      reg = list(range(m * bs, m * bs + bs - 1))
      w = np.exp(np.array([q[i] @ k[j] for j in reg]) / 2.0)
      want = want + pl * sum(wj / w.sum() * v[j] for wj, j in zip(w, reg))
    np.testing.assert_allclose(o[i], want, atol=1e-5)


@pytest.mark.parametrize("top_k", [None, 2])
def test_decode_matches_forward(top_k):
  # top_k=None: retrieval through block_indices over every block == dense grouped softmax.
  # Decode retrieves per token, so the forward does too here (query_tile 1).
  model = zoo.build(landmark(top_k=top_k, query_tile=1), rngs=1)
  x = tokens(1, 2, 20)  # 7 blocks of 3 tokens + landmark
  fwd, step = jitted(model)
  full = fwd(x)
  state = model.init_state(2, 20)
  a, state = step(x[:, :11], state)
  b, state = step(x[:, 11:], state)
  np.testing.assert_allclose(jnp.concatenate([a, b], axis=1), full, atol=ATOL)
  assert state["lengths"].tolist() == [20, 20] and state["internal"].tolist() == [26, 26]


def test_top_k_covering_every_block_equals_dense():
  x = tokens(2, 1, 20)
  dense = jitted(zoo.build(landmark(), rngs=2))[0](x)
  wide = jitted(zoo.build(landmark(top_k=7), rngs=2))[0](x)
  narrow = jitted(zoo.build(landmark(top_k=1), rngs=2))[0](x)
  np.testing.assert_allclose(wide, dense, atol=ATOL)
  assert np.abs(np.asarray(narrow - dense)).max() > 1e-4


def test_causal_and_gradients():
  model = zoo.build(landmark(), rngs=3)
  x = tokens(3, 2, 16)
  y = x.at[:, 9].set((x[:, 9] + 1) % 260)
  both = jitted(model)[0](jnp.concatenate([x, y]))
  np.testing.assert_allclose(both[:2, :9], both[2:, :9], atol=1e-6)
  assert np.abs(np.asarray(both[:2, 9:] - both[2:, 9:])).max() > 1e-4
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(x)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0]
    return jnp.mean(nll)

  grads = jax.jit(jax.grad(loss))(params)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_bad_config_names_field():
  with pytest.raises(ValueError, match="block_size"):
    landmark(block_size=1)
  with pytest.raises(ValueError, match="top_k"):
    landmark(top_k=0)


@pytest.mark.slow
def test_trains_on_mqar_beyond_chance():
  from pipelines.tasks import MQAR
  from pipelines.tasks.training import Budget, train_on_task

  cfg = landmark(block_size=8, backbone=zoo.config("transformer", "tiny", d_model=64, d_ff=128))
  train = MQAR(length=64, num_pairs=4, token_range=(0, 64), seed=0)
  evals = MQAR(length=64, num_pairs=4, token_range=(0, 64), seed=1)
  out = train_on_task(
    cfg, train, evals, Budget(steps=200, batch_size=16, lr=3e-3, eval_examples=64)
  )
  assert out["accuracy"] > 3 * out["chance"]


def _tiled(**kw):
  # Blocks of 16 (15 tokens + landmark) and query tiles of 16: what the GPU kernel takes.
  # 60 tokens: 4 blocks, so queries of the last block choose among 3 previous ones.
  small = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 1, "max_len": 64}
  bb = zoo.config("transformer", "tiny", **small)
  return zoo.config("landmark", "tiny", **{"backbone": bb, "block_size": 16, **kw})


def _forward_on(backend, cfg, x, monkeypatch):
  """The forward under the simulated ``backend`` (None: this CPU), and what served attention."""
  import ops.common

  if backend is None:
    monkeypatch.delenv(ops.common.SIMULATE_ENV, raising=False)
  else:
    monkeypatch.setenv(ops.common.SIMULATE_ENV, backend)
  ops.common.reset_served()
  out = jitted(zoo.build(cfg, rngs=4))[0](x)
  return out, ops.common.served().get("dot_product_attention")


def test_query_tiles_reach_the_pallas_kernel_and_match_xla(monkeypatch):
  # top_k 1 per tile of 16 queries: the own-block and retrieval calls are all served by the
  # Pallas kernel (interpreted) under the simulated GPU and equal XLA with the same tiles.
  x = tokens(5, 1, 60)
  got, record = _forward_on("gpu", _tiled(top_k=1, query_tile=16), x, monkeypatch)
  assert set(record["served"]) == {"pallas_gpu"}, record
  want, cpu = _forward_on(None, _tiled(top_k=1, query_tile=16), x, monkeypatch)
  assert set(cpu["served"]) == {"xla"}
  np.testing.assert_allclose(got, want, atol=ATOL)
  # Per-token retrieval (the dense grouped softmax) chooses other blocks for some queries.
  per_token, _ = _forward_on(None, _tiled(top_k=1, query_tile=1), x, monkeypatch)
  assert np.abs(np.asarray(per_token - want)).max() > 1e-4
  # The first block has no previous block: retrieval does not touch it.
  np.testing.assert_allclose(per_token[:, :15], want[:, :15], atol=ATOL)


def test_query_tiles_covering_every_block_equal_dense(monkeypatch):
  # top_k 3 covers every previous block: the kernel path equals the dense grouped softmax.
  x = tokens(6, 1, 60)
  got, record = _forward_on("gpu", _tiled(top_k=3, query_tile=16), x, monkeypatch)
  assert set(record["served"]) == {"pallas_gpu"}, record
  dense, _ = _forward_on(None, _tiled(), x, monkeypatch)
  np.testing.assert_allclose(got, dense, atol=ATOL)


def test_query_tile_must_divide_the_block():
  with pytest.raises(ValueError, match="query_tile"):
    _tiled(top_k=1, query_tile=5)
