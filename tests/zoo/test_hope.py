"""Hope: the continuum memory system's update schedule, decode == forward, causality, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.ops.test_neural_memory_semantics import independent_self_targets
from tests.zoo.helpers import step_fn
from zoo.hope.cms import CMSLevel
from zoo.layers.neural_memory import NeuralMemory

# Float32; differences come from summation order (a chunk's gradient summed at once in the
# forward, token by token in decoding; chunked vs stepped neural memory).
TOL = {"cms": 1e-5, "decode": 1e-4, "causal": 1e-6}


def tiny(**kw):
  base = dict(d_model=32, n_heads=2, n_layers=1, chunk_size=2, cms_chunk_sizes=(1, 3))
  return zoo.config("hope", "tiny", **{**base, "cms_hidden": 32, **kw})


def tokens(key, b, t):
  return jax.random.randint(jax.random.key(key), (b, t), 0, 260)


def test_cms_level_updates_once_per_chunk():
  level = CMSLevel(8, 16, 4, 1.0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 8))
  got, final = level(x)
  # Written from the definition: chunk n reads W_n; W_{n+1} = W_n - sum_t theta_t grad l_t(W_n).
  k = x
  v = x @ level.w_target[...]
  # theta = lr_max sigmoid(.) / chunk_size: lr_max caps the summed step of a chunk.
  theta = jax.nn.sigmoid(x @ level.w_lr[...] + level.b_lr[...]) / 4
  mlp = lambda w, inp: jax.nn.silu(inp @ w[0]) @ w[1]
  want = []
  for b in range(2):
    w = (level.w1[...], level.w2[...])
    for lo in range(0, 10, 4):
      want.append(mlp(w, k[b, lo : lo + 4]))

      def loss(w, lo=lo, b=b):
        err = mlp(w, k[b, lo : lo + 4]) - v[b, lo : lo + 4]
        return jnp.sum(theta[b, lo : lo + 4] * jnp.mean(err**2, -1))

      if lo + 4 <= 10:
        g = jax.grad(loss)(w)
        w = (w[0] - g[0], w[1] - g[1])
    assert np.allclose(final["weights"]["w1"][b], w[0], atol=TOL["cms"])
  np.testing.assert_allclose(got, jnp.concatenate(want).reshape(2, 10, 8), atol=TOL["cms"])
  # The weights moved, and only at chunk boundaries: the first chunk reads the initial MLP.
  assert np.abs(np.asarray(final["weights"]["w1"] - level.w1[...])).max() > 1e-4
  assert int(final["position"]) == 10
  assert np.abs(np.asarray(final["grad"]["w1"])).max() > 0  # tokens 8, 9: pending update
  stepped, s = level.step(x[:, :7], level.init_state(2))
  stepped2, s = level.step(x[:, 7:], s)
  np.testing.assert_allclose(jnp.concatenate([stepped, stepped2], 1), got, atol=TOL["cms"])
  for name in ("w1", "w2"):
    np.testing.assert_allclose(s["grad"][name], final["grad"][name], atol=TOL["cms"])
    np.testing.assert_allclose(s["weights"][name], final["weights"][name], atol=TOL["cms"])


@pytest.mark.parametrize(
  "kw",
  [{}]
  + [
    pytest.param(kw, marks=pytest.mark.slow)
    for kw in ({"self_modifying": False, "memory_depth": 1}, {"self_targets": False})
  ],
)
def test_decode_matches_forward_and_causal(kw):
  model = zoo.build(tiny(**kw), rngs=1)
  graphdef, state = nnx.split(model)

  def run(state, x):
    m = nnx.merge(graphdef, state)
    full, aux = m(x)
    dec = m.init_state(2, 16)
    first, dec = m.step(x[:, :5], dec)

    def body(s, tok):
      logits, s = m.step(tok[:, None], s)
      return s, logits[:, 0]

    _, rest = jax.lax.scan(body, dec, jnp.moveaxis(x[:, 5:], 1, 0))
    return full, aux, jnp.concatenate([first, jnp.moveaxis(rest, 0, 1)], axis=1)

  run = jax.jit(run)
  x = tokens(1, 2, 11)
  full, aux, dec = run(state, x)
  assert aux["cms_drift"].shape == (1, 2) and np.all(np.asarray(aux["cms_drift"]) > 0)
  np.testing.assert_allclose(dec, full, atol=TOL["decode"], rtol=TOL["decode"])
  y = x.at[:, 6].set((x[:, 6] + 1) % 260)
  full_y, _, _ = run(state, y)
  np.testing.assert_allclose(full_y[:, :6], full[:, :6], atol=TOL["causal"])
  assert np.abs(np.asarray(full_y[:, 6:] - full[:, 6:])).max() > 1e-4


def test_kv_generator_trains_on_its_own_targets():
  """The self-modifying key/value generator (depth 1, read with the static key k) is trained
  on its own targets ``M_{t-1}(v)`` of the static value v (Nested Learning): its final weights
  equal that recurrence written token by token in the test (chunk_size 1); without
  ``kv_self_targets`` (the static ``[k, v]`` as targets) they differ."""

  def build(kv_self_targets):
    layer = NeuralMemory(
      16, 2, 8, chunk_size=1, adaptive_kv=True, kv_self_targets=kv_self_targets, rngs=nnx.Rngs(3)
    )
    # A generator away from its [I, I] start, so its own targets are not the static ones.
    noise = jax.random.normal(jax.random.key(4), layer.kv_memory.shape)
    layer.kv_memory[...] = layer.kv_memory[...] + 0.3 * noise
    return layer

  layer = build(True)
  x = jax.random.normal(jax.random.key(5), (2, 5, 16))
  _, state = layer(x)
  _, k, v, lr, eta, alpha, _ = layer.project(x, None)
  gates = {"lr": lr, "momentum": eta, "decay": alpha}
  _, want = independent_self_targets((k, k, v), gates, {"w": layer.kv_memory[...]})
  got = state["kv_memory"]["weights"]["w"]
  np.testing.assert_allclose(got, want["w"], atol=TOL["cms"], rtol=TOL["cms"])
  _, old = build(False)(x)
  assert np.abs(np.asarray(old["kv_memory"]["weights"]["w"] - got)).max() > 1e-4
  with pytest.raises(ValueError, match="adaptive_kv"):
    NeuralMemory(16, 2, 8, kv_self_targets=True, rngs=nnx.Rngs(0))
  # The config switch: self targets by default, the static targets still reachable.
  flags = lambda **kw: zoo.build(tiny(**kw), rngs=0).blocks[0].memory.kv_self_targets
  assert flags() and not flags(self_targets=False) and not flags(self_modifying=False)


def test_decode_state_size_is_constant_in_context_length():
  model = zoo.build(tiny(), rngs=0)
  # The state after 3 and after 40 decoded tokens (past the max_len of 16 it was built for)
  # keeps the initial shapes and carries the context (the two states differ).
  start = model.init_state(2, 16)
  x = tokens(9, 2, 40)
  _, short = step_fn(model)(x[:, :3], start)
  _, long = step_fn(model)(x, start)
  shapes = lambda s: jax.tree.map(jnp.shape, s)
  assert shapes(short) == shapes(long) == shapes(start)
  diff = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b), initial=0.0)), short["blocks"], long["blocks"]
  )
  assert max(jax.tree.leaves(diff)) > 1e-4


def test_gradients_finite_and_nonzero():
  model = zoo.build(tiny(), rngs=4)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = tokens(5, 2, 8)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(x)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0]
    return jnp.mean(nll)

  flat = jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(params))
  for path, g in flat:
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path
  # The self-modifying memory's initial key/value generator is trained by the outer loop.
  assert any("kv_memory" in jax.tree_util.keystr(p) for p, _ in flat)


def test_bad_config_names_the_field():
  for kw, field in [
    ({"cms_chunk_sizes": (1, 0)}, "cms_chunk_sizes"),
    ({"chunk_size": 6}, "chunk_size"),
    ({"cms_lr_max": 0.0}, "cms_lr_max"),
    ({"cms_hiden": 3}, "cms_hidden"),
  ]:
    with pytest.raises(ValueError, match=field):
      tiny(**kw)
  for preset in ("tiny", "small", "base"):
    c = zoo.config("hope", preset)
    abstract = nnx.eval_shape(lambda c=c: zoo.build(c, rngs=0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) > 0


@pytest.mark.slow
def test_mqar_beats_chance():
  from pipelines.tasks import MQAR
  from pipelines.tasks.training import Budget, train_on_task

  task = dict(length=32, num_pairs=4, token_range=(0, 64))
  result = train_on_task(
    tiny(d_model=64, n_heads=4, n_layers=2, chunk_size=8, cms_chunk_sizes=(4, 16)),
    MQAR(**task, seed=0),
    MQAR(**task, seed=1),
    Budget(steps=150, batch_size=16, lr=3e-3),
  )
  assert result["accuracy"] > 2 * result["chance"], result
