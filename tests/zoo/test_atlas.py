"""ATLAS as a configuration of Titans: the Omega rule (with learned gamma) + poly features + Muon,
the Hebbian DeepTransformer, decode, gradients."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo.layers.neural_memory import NeuralMemory

# Float32; the Muon path runs five Newton-Schulz iterations (cubic in the weights), which
# amplifies summation-order differences more than the momentum path does.
TOL = {
  "paper_update": 1e-4,
  "decode": 2e-4,
  "same_as_titans": 1e-6,
  "causal": 1e-6,
}


def tiny(**kw):
  base = dict(d_model=32, n_heads=4, n_layers=1, d_ff=64, chunk_size=2, omega_window=3)
  return zoo.config("atlas", "tiny", **{**base, "n_persistent": 2, **kw})


def tokens(key, b, t):
  return jax.random.randint(jax.random.key(key), (b, t), 0, 260)


def _poly2(x):  # phi(x).phi(y) = 1 + x.y + (x.y)^2 / 2
  outer = jnp.einsum("...i,...j->...ij", x, x).reshape(*x.shape[:-1], -1)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x, outer / math.sqrt(2.0)], axis=-1)


def _newton_schulz(g, steps=5):
  """Muon's quintic iteration (Jordan et al. 2024) on one matrix."""
  a, b, c = 3.4445, -4.7750, 2.0315
  x = g / jnp.linalg.norm(g)
  tall = x.shape[0] > x.shape[1]
  x = x.T if tall else x
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def _atlas_memory(layer, x, window, gamma=None):
  """ATLAS token by token from the paper: Omega loss over the last ``window`` tokens,
  sum_s gamma_s ||M(phi(k_s)) - v_s||^2 (``gamma [B,T,H]``, default 1),
  U_t = eta_t U_{t-1} - grad, M_t = (1 - alpha_t) M_{t-1} + theta_t NS(U_t), y_t = M_t(phi(q_t))."""
  q, k, v, theta, eta, alpha, _ = layer.project(x, None)
  q, k = _poly2(q), _poly2(k)
  batch, length, heads = q.shape[:3]
  gamma = jnp.ones((batch, length, heads)) if gamma is None else gamma
  init = layer.initial_weights()

  def mlp(w, inp):
    return jax.nn.silu(inp @ w["w1"]) @ w["w2"]

  def omega_loss(w, ks, vs, gs):
    err = jax.vmap(lambda kk: mlp(w, kk))(ks) - vs
    return jnp.sum(gs * jnp.sum(err**2, axis=-1))

  @jax.jit
  def token(w, u, ks, vs, gs, th, et, al, qt):
    g = jax.grad(omega_loss)(w, ks, vs, gs)
    u = {n: et * u[n] - g[n] for n in w}
    w = {n: (1.0 - al) * w[n] + th * _newton_schulz(u[n]) for n in w}
    return w, u, mlp(w, qt)

  out = np.zeros((batch, length, heads, v.shape[-1]), np.float32)
  for b in range(batch):
    for h in range(heads):
      w = {n: init[n][h] for n in init}
      u = jax.tree.map(jnp.zeros_like, w)
      for t in range(length):
        lo = max(0, t - window + 1)
        win = (k[b, lo : t + 1, h], v[b, lo : t + 1, h], gamma[b, lo : t + 1, h])
        args = (theta[b, t, h], eta[b, t, h], alpha[b, t, h], q[b, t, h])
        w, u, out[b, t, h] = token(w, u, *win, *args)
  return layer.output(jnp.asarray(out), x.dtype)


def test_omega_muon_poly_layer_equals_the_paper_update():
  kw = dict(hidden=8, chunk_size=1, conv_size=0, omega_window=3, feature_map="poly2")
  layer = NeuralMemory(12, 2, 4, **kw, optimizer="muon", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 6, 12))
  got, _ = jax.jit(lambda x: layer(x))(x)
  want = _atlas_memory(layer, x, window=3)
  np.testing.assert_allclose(got, want, atol=TOL["paper_update"], rtol=TOL["paper_update"])


def test_learned_omega_weights_equal_the_paper_update():
  # ATLAS's gamma_t in [0, 1] from the input: a per-head linear map + sigmoid, written here
  # from the layer's parameters, weighting each token's error in every window it is in.
  kw = dict(hidden=8, chunk_size=1, conv_size=0, omega_window=3, feature_map="poly2")
  layer = NeuralMemory(12, 2, 4, **kw, optimizer="muon", learn_omega_weights=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 6, 12))
  gamma = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x, layer.w_omega[...]) + layer.b_omega[...])
  assert 0.05 < float(gamma.min()) and float(gamma.max()) < 0.999  # weights, not all ~1
  got, _ = jax.jit(lambda x: layer(x))(x)
  want = _atlas_memory(layer, x, window=3, gamma=gamma)
  np.testing.assert_allclose(got, want, atol=TOL["paper_update"], rtol=TOL["paper_update"])
  # gamma is not ignored: the fixed rule (gamma = 1) gives something else.
  fixed = _atlas_memory(layer, x, window=3)
  assert np.abs(np.asarray(got - fixed)).max() > 1e-3


def test_learned_omega_weights_decode_equals_forward():
  kw = dict(hidden=8, chunk_size=2, conv_size=3, omega_window=3, feature_map="poly2")
  layer = NeuralMemory(12, 2, 4, **kw, learn_omega_weights=True, rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(3), (2, 7, 12))

  @jax.jit
  def run(x):
    full, _ = layer(x)
    first, state = layer(x[:, :3], layer.init_state(2))  # a prefix ending mid-chunk
    outs = [first]
    for t in range(3, x.shape[1]):
      y, state = layer(x[:, t : t + 1], state)
      outs.append(y)
    return full, jnp.concatenate(outs, axis=1)

  full, dec = run(x)
  np.testing.assert_allclose(dec, full, atol=TOL["decode"], rtol=TOL["decode"])


def test_titans_options_give_the_titans_model():
  # Atlas adds no code to Titans: with Titans' options it has the same config fields and,
  # from the same seed, the same parameters, so it computes the same function.
  titans_kw = dict(omega_window=1, feature_map="identity", optimizer="momentum", variant="mag")
  atlas_cfg = tiny(**titans_kw)
  titans_cfg = zoo.config(
    "titans", "tiny", d_model=32, n_heads=4, n_layers=1, d_ff=64, chunk_size=2, n_persistent=2
  )
  fields = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k != "family"}
  assert fields(atlas_cfg) == fields(titans_cfg)
  atlas = nnx.state(nnx.eval_shape(lambda: zoo.build(atlas_cfg, rngs=3)), nnx.Param)
  assert jax.tree.structure(atlas) == jax.tree.structure(
    nnx.state(nnx.eval_shape(lambda: zoo.build(titans_cfg, rngs=3)), nnx.Param)
  )
  pa = nnx.state(zoo.build(atlas_cfg, rngs=3), nnx.Param)
  pt = nnx.state(zoo.build(titans_cfg, rngs=3), nnx.Param)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pt)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
  "kw",
  [
    {},  # ATLAS: Omega window 3, poly2, Muon, memory-only stack
    # The Hebbian DeepTransformer (poly3 features, learned gamma as the write strength).
    dict(
      objective="dot",
      optimizer="momentum",
      omega_window=1,
      feature_map="poly3",
      learn_omega_weights=True,
    ),
    pytest.param({"optimizer": "momentum", "variant": "mal"}, marks=pytest.mark.slow),
  ],
  ids=["atlas", "deep_transformer", "omeganet_mal"],
)
def test_decode_matches_forward_and_causal(kw):
  model = zoo.build(tiny(**kw), rngs=1)
  graphdef, state = nnx.split(model)

  def run(state, x):
    m = nnx.merge(graphdef, state)
    full, _ = m(x)
    dec = m.init_state(2, 16)
    first, dec = m.step(x[:, :5], dec)

    def body(s, tok):
      logits, s = m.step(tok[:, None], s)
      return s, logits[:, 0]

    _, rest = jax.lax.scan(body, dec, jnp.moveaxis(x[:, 5:], 1, 0))
    return full, jnp.concatenate([first, jnp.moveaxis(rest, 0, 1)], axis=1)

  run = jax.jit(run)
  x = tokens(1, 2, 11)
  full, dec = run(state, x)
  np.testing.assert_allclose(dec, full, atol=TOL["decode"], rtol=TOL["decode"])
  y = x.at[:, 6].set((x[:, 6] + 1) % 260)
  full_y, _ = run(state, y)
  np.testing.assert_allclose(full_y[:, :6], full[:, :6], atol=TOL["causal"])
  assert np.abs(np.asarray(full_y[:, 6:] - full[:, 6:])).max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
  "kw",
  [
    {},
    dict(
      objective="dot",
      optimizer="momentum",
      omega_window=2,
      feature_map="poly3",
      learn_omega_weights=True,
    ),
  ],
  ids=["atlas", "hebbian_learned_gamma"],
)
def test_gradients_finite_and_nonzero(kw):
  # Every parameter, incl. the Omega-weight projection when it is learned, gets a gradient.
  model = zoo.build(tiny(**kw), rngs=4)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = tokens(5, 2, 8)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(x)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0]
    return jnp.mean(nll)

  for path, g in jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(params)):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path


def test_config_defaults_and_bad_fields():
  cfg = zoo.config("atlas", "tiny")
  assert (cfg.family, cfg.omega_window, cfg.feature_map, cfg.optimizer) == (
    "atlas",
    4,
    "poly2",
    "muon",
  )
  with pytest.raises(ValueError, match="omega_window"):
    tiny(omega_window=0)
  with pytest.raises(ValueError, match="optimizer"):
    tiny(optimizer="adam")
  with pytest.raises(ValueError, match="objective"):
    tiny(objective="hebbian")
  with pytest.raises(ValueError, match="feature_map"):
    tiny(feature_map="poly5")
  for preset in ("tiny", "small", "base"):
    c = zoo.config("atlas", preset)
    abstract = nnx.eval_shape(lambda c=c: zoo.build(c, rngs=0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) > 0


@pytest.mark.slow
def test_mqar_beats_chance():
  from pipelines.tasks import MQAR
  from pipelines.tasks.training import Budget, train_on_task

  task = dict(length=32, num_pairs=4, token_range=(0, 64))
  result = train_on_task(
    tiny(d_model=64, d_ff=128, n_layers=2, n_heads=8, chunk_size=8),
    MQAR(**task, seed=0),
    MQAR(**task, seed=1),
    Budget(steps=150, batch_size=16, lr=3e-3),
  )
  assert result["accuracy"] > 2 * result["chance"], result
