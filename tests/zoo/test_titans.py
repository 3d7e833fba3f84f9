"""Titans (MAC, MAG, MAL, LMM): the paper's update, decode == forward, causality, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from pipelines.data.tokenizer import SEP
from pipelines.tasks.base import Builder, TaskSource
from tests.zoo.helpers import step_fn
from zoo.layers.neural_memory import NeuralMemory, causal_conv

# Float32 throughout; differences come from summation order only (chunked vs token-by-token
# memory, blockwise vs cached attention, merged log-sum-exps).
TOL = {
  "paper_update": 2e-5,
  "decode": 1e-4,
  "causal": 1e-6,
}
VARIANTS = ("lmm", "mag", "mal", "mac")
# MAG and MAL share LMM's block code plus the transformer's tested attention cache; their
# decode checks are slow-marked to keep the unmarked file within the CPU budget.
FAST_VARIANTS = [
  v if v in ("lmm", "mac") else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS
]


def tiny(**kw):
  base = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, window=6, segment_size=4, chunk_size=2)
  base.update(n_persistent=2)
  return zoo.config("titans", "tiny", **{**base, **kw})


def tokens(key, b, t):
  return jax.random.randint(jax.random.key(key), (b, t), 0, 260)


def _paper_memory(layer, x):
  """Titans Sec. 3.1 token by token, written from the paper's equations (not the op):
  loss ||M(k_t) - v_t||^2, S_t = eta_t S_{t-1} - theta_t grad, M_t = (1 - alpha_t) M_{t-1} + S_t,
  y_t = M_t(q_t), with a depth-2 memory ``M(x) = W2^T silu(W1^T x)`` per head."""
  q, k, v, theta, eta, alpha, _ = layer.project(x, None)
  weights = {
    n: jnp.broadcast_to(w, (x.shape[0], *w.shape)) for n, w in layer.initial_weights().items()
  }

  def mlp(w, inp):  # per (batch, head): w1 [F,Dh], w2 [Dh,V]; inp [F]
    return jax.nn.silu(inp @ w["w1"]) @ w["w2"]

  def loss(w, kk, vv):
    return jnp.sum((mlp(w, kk) - vv) ** 2)

  per_head = lambda f: jax.vmap(jax.vmap(f))
  surprise = jax.tree.map(jnp.zeros_like, weights)
  ys = []
  for t in range(x.shape[1]):
    grad = per_head(jax.grad(loss))(weights, k[:, t], v[:, t])
    th, et, al = (g[:, t, :, None, None] for g in (theta, eta, alpha))
    surprise = {n: et * surprise[n] - th * grad[n] for n in grad}
    weights = {n: (1.0 - al) * weights[n] + surprise[n] for n in grad}
    ys.append(per_head(mlp)(weights, q[:, t]))
  return layer.output(jnp.stack(ys, axis=1), x.dtype)


def test_chunk_size_one_equals_the_paper_update():
  layer = NeuralMemory(16, 2, 8, hidden=16, chunk_size=1, conv_size=0, rngs=nnx.Rngs(0))
  # Larger inner steps than the default so the memory moves visibly within 12 tokens.
  layer.b_gates[...] = layer.b_gates[...].at[0].set(3.0)
  x = jax.random.normal(jax.random.key(1), (2, 12, 16))
  got, _ = jax.jit(lambda x: layer(x))(x)
  want = _paper_memory(layer, x)
  np.testing.assert_allclose(got, want, atol=TOL["paper_update"], rtol=TOL["paper_update"])
  # The memory really learned: reading the initial weights gives a different answer.
  frozen = layer.retrieve(x, {n: w[None] for n, w in layer.initial_weights().items()})
  assert np.abs(np.asarray(got - frozen)).max() > 1e-3


def test_causal_conv_carries_history():
  w = jax.random.normal(jax.random.key(0), (4, 3))
  x = jax.random.normal(jax.random.key(1), (2, 9, 3))
  full, _ = causal_conv(x, w, jnp.zeros((2, 3, 3)))
  a, hist = causal_conv(x[:, :5], w, jnp.zeros((2, 3, 3)))
  b, _ = causal_conv(x[:, 5:], w, hist)
  np.testing.assert_allclose(jnp.concatenate([a, b], 1), full, atol=1e-6)
  want = sum(w[i] * jnp.pad(x, ((0, 0), (3 - i, 0), (0, 0)))[:, :9] for i in range(4))
  np.testing.assert_allclose(full, want, atol=1e-6)


def _compiled(cfg, batch, prefill, length):
  """One jit computing the forward logits and the decoded logits (prefill, then 1 by 1)."""
  model = zoo.build(cfg, rngs=0)
  graphdef, state = nnx.split(model)

  def run(state, x):
    m = nnx.merge(graphdef, state)
    full, aux = m(x)
    dec = m.init_state(batch, length)
    first, dec = m.step(x[:, :prefill], dec)

    def body(s, tok):
      logits, s = m.step(tok[:, None], s)
      return s, logits[:, 0]

    dec, rest = jax.lax.scan(body, dec, jnp.moveaxis(x[:, prefill:], 1, 0))
    return full, aux, jnp.concatenate([first, jnp.moveaxis(rest, 0, 1)], axis=1)

  return jax.jit(run), state


@pytest.mark.parametrize("variant", FAST_VARIANTS)
def test_decode_matches_forward_and_causal(variant):
  # T = 11 with segment 4 and chunk 2: prefill 5 tokens straddles a segment and a chunk.
  run, state = _compiled(tiny(variant=variant), 2, 5, 11)
  x = tokens(1, 2, 11)
  full, aux, dec = run(state, x)
  assert full.shape == (2, 11, 260) and full.dtype == jnp.float32
  assert aux["memory_norm"].shape == (1,) and np.all(np.isfinite(aux["memory_norm"]))
  np.testing.assert_allclose(dec, full, atol=TOL["decode"], rtol=TOL["decode"])
  y = x.at[:, 6].set((x[:, 6] + 1) % 260)
  full_y, _, _ = run(state, y)
  np.testing.assert_allclose(full_y[:, :6], full[:, :6], atol=TOL["causal"])
  assert np.abs(np.asarray(full_y[:, 6:] - full[:, 6:])).max() > 1e-4


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_decode_state_size_is_constant_in_context_length(variant):
  model = zoo.build(tiny(variant=variant), rngs=0)
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


def _grads(cfg):
  model = zoo.build(cfg, rngs=4)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = tokens(5, 2, 10)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(x)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0]
    return jnp.mean(nll)

  return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize(
  "variant", ["lmm", *(pytest.param(v, marks=pytest.mark.slow) for v in ("mag", "mal", "mac"))]
)
def test_gradients_finite_and_nonzero(variant):
  grads = _grads(tiny(variant=variant))
  flat = jax.tree_util.tree_leaves_with_path(grads)
  for path, g in flat:
    assert np.all(np.isfinite(g)), path
    assert np.abs(g).max() > 0, path
  # The memory's learned initial weights and its gates are trained by the outer loop.
  names = [jax.tree_util.keystr(p) for p, _ in flat]
  assert any("memory" in n and "w1" in n for n in names)
  assert any("b_gates" in n for n in names)


def test_bad_config_names_the_field():
  for kw, field in [
    ({"chunk_size": 3}, "chunk_size"),
    ({"memory_depth": 3}, "memory_depth"),
    ({"window": 0}, "window"),
    ({"memory_lr_max": 2.0}, "memory_lr_max"),
    ({"n_persistent": -1}, "n_persistent"),
  ]:
    with pytest.raises(ValueError, match=field):
      tiny(**kw)
  with pytest.raises(ValueError, match="variant"):
    tiny(variant="mat")


def test_presets_build():
  for preset in ("tiny", "small", "base"):
    cfg = zoo.config("titans", preset)
    abstract = nnx.eval_shape(lambda c=cfg: zoo.build(c, rngs=0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) > 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lmm", "mag", "mal"])
def test_mqar_beats_chance(variant):
  from pipelines.tasks import MQAR
  from pipelines.tasks.training import Budget, train_on_task

  task = dict(length=32, num_pairs=4, token_range=(0, 64))
  result = train_on_task(
    tiny(variant=variant, d_model=64, d_ff=128, n_layers=2, window=16, segment_size=8),
    MQAR(**task, seed=0),
    MQAR(**task, seed=1),
    Budget(steps=150, batch_size=16, lr=3e-3),
  )
  assert result["accuracy"] > 2 * result["chance"], result


class LateQueryMQAR(TaskSource):
  """MQAR whose key-value pairs all sit in the first ``first_query`` tokens and whose queries all
  come after them: ``BOS k1 v1 .. kN vN SEP..SEP | queries k v in SEP filler``.

  With ``first_query`` equal to MAC's segment size, every key is bound in segment 0 and asked
  in a later segment, where attention cannot see it: only the memory carries it across.
  """

  name = "late_query_mqar"

  def __init__(self, *, length, num_pairs, token_range, first_query, seed=0, num_examples=10_000):
    super().__init__(length=length, seed=seed, num_examples=num_examples)
    if 2 * num_pairs + 1 > first_query or length + 1 - first_query < 2 * num_pairs:
      raise ValueError("pairs must fit before first_query and queries after it")
    self.num_pairs, self.first_query = num_pairs, first_query
    self.lo, self.hi = token_range
    self.mid = (self.lo + self.hi) // 2

  @property
  def chance(self) -> float:
    return 1.0 / (self.hi - self.mid)

  def _example(self, rng):
    n = self.num_pairs
    keys = self.lo + rng.choice(self.mid - self.lo, n, replace=False)
    values = rng.integers(self.mid, self.hi, n)
    b = Builder()
    b.add(np.stack([keys, values], 1))
    b.add(np.full(self.first_query - b.pos, SEP))
    region = self.length + 1 - self.first_query
    starts = np.sort(rng.choice(region - n, n, replace=False)) + np.arange(n)
    prev = 0
    for start, i in zip(starts, rng.permutation(n)):
      b.add(np.full(start - prev, SEP))
      b.add(keys[i : i + 1])
      b.add(values[i : i + 1], answer=True)
      prev = start + 2
    b.add(np.full(region - prev, SEP))
    return b.finish(self.length, query_pos=(self.first_query + starts).astype(np.int32))


def test_late_query_mqar_binds_in_the_first_segment_and_asks_later():
  src = LateQueryMQAR(length=48, num_pairs=2, token_range=(0, 16), first_query=16)
  for i in range(20):
    ex = src[i]
    assert ex["inputs"].shape == (48,) and ex["loss_mask"].sum() == 2
    answers = np.flatnonzero(ex["loss_mask"])  # target index = input index of the asked key
    assert np.all(answers >= 16)
    for a in answers:
      key, value = ex["inputs"][a], ex["targets"][a]
      pair = int(np.flatnonzero(ex["inputs"][:16] == key)[0])
      assert pair < 16 and ex["inputs"][pair + 1] == value


@pytest.mark.slow
def test_mac_recalls_across_segments():
  """Keys bound in segment 0, asked in segments 1 and 2 (48 tokens, 16-token segments)."""
  from pipelines.tasks.training import Budget, train_on_task

  task = dict(length=48, num_pairs=2, token_range=(0, 16), first_query=16)
  # The default inner learning rate: memory_lr_max caps a chunk's summed step, so runs of
  # repeated filler tokens no longer make the depth-2 memory diverge (under the former
  # parameterisation this test needed a 5x lower cap).
  cfg = tiny(
    variant="mac",
    d_model=64,
    d_ff=128,
    n_layers=2,
    window=16,
    segment_size=16,
    chunk_size=4,
  )
  result = train_on_task(
    cfg,
    LateQueryMQAR(**task, seed=0),
    LateQueryMQAR(**task, seed=1, num_examples=128),
    Budget(steps=300, batch_size=16, lr=3e-3, eval_examples=128),
  )
  # Measured 0.34 vs chance 0.125; 2x chance on 256 answers is 4.8 standard deviations up.
  assert np.isfinite(result["last_loss"]), result
  assert result["accuracy"] > 2 * result["chance"], result


def test_inner_step_is_capped_per_chunk():
  """Aligned keys (one repeated input) with wide-open gates: the chunk's summed step stays
  within the cap and the memory stays bounded; the former per-token rate (theta = lr_max
  sigmoid(.), raw momentum) blows up on the same input."""
  import ops.memory.neural as nm
  from ops.memory.neural.common import mlp_apply

  layer = NeuralMemory(16, 2, 8, hidden=16, chunk_size=8, conv_size=0, rngs=nnx.Rngs(0))
  layer.b_gates[...] = jnp.broadcast_to(jnp.array([6.0, 4.0, -8.0])[:, None], (3, 2))
  x = jnp.broadcast_to(jax.random.normal(jax.random.key(3), (1, 1, 16)), (1, 128, 16))
  q, k, v, lr, eta, alpha, _ = layer.project(x, None)
  np.testing.assert_allclose(jnp.sum(lr[0, :8], 0) / (1 - eta[0, 0]), 0.5, rtol=0.01)

  def final_norm(theta):
    y, state = nm.neural_memory(
      q, k, v, lr=theta, momentum=eta, decay=alpha, memory=layer.initial_weights(), chunk_size=8
    )
    w = state["weights"]
    return float(jnp.sqrt(sum(jnp.sum(a * a) for a in w.values()))), y, w

  def error(w):  # ||M(k) - v|| of the repeated pair
    return float(jnp.linalg.norm(mlp_apply(w, k[:, -1], "silu", False) - v[:, -1]))

  init = {n: a[None] for n, a in layer.initial_weights().items()}
  start = float(jnp.sqrt(sum(jnp.sum(a * a) for a in init.values())))
  capped, y, w = final_norm(lr)
  assert np.all(np.isfinite(np.asarray(y))) and capped < 3 * start
  # The capped memory still learns the repeated pair (slowly: eta = 0.98 spreads each write
  # over ~50 tokens, so 128 tokens halve the error).
  assert error(w) < 0.7 * error(init)
  former, _, _ = final_norm(layer.lr_max * jax.nn.sigmoid(6.0) * jnp.ones_like(lr))
  assert not np.isfinite(former) or former > 1e3 * start
