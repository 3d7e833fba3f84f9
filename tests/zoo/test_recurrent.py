"""Recurrent families (BASED, DeltaNet, gated DeltaNet, Mamba-2, MoM, JRT): shared layers,
registry and config checks, and the per-model checks the family test files call.

The helpers here (``Compiled``, ``check_*``, ``train_mqar``) are imported by ``test_based.py``,
``test_deltanet.py``, ``test_mamba2.py``, ``test_mom.py`` and ``test_jrt.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.zoo.helpers import step_fn
from zoo.layers.conv import ShortConv
from zoo.layers.linear_attention import LinearAttention, decay_params, taylor
from zoo.layers.recurrent_lm import AttentionMixer
from zoo.mom.model import route

# Tolerances. Models are float32; decode runs the step recurrence (or the chunked op with an
# initial state) where the forward runs one chunked scan, so only summation order differs.
TOL = {
  "decode": 2e-4,
  "packed": 2e-4,
  # A change at t must leave earlier logits bit-for-bit alone up to masked-zero arithmetic.
  "causal": 1e-5,
  "conv": 1e-6,
  "feature": 1e-5,
}

FAMILIES = ("based", "deltanet", "gated_deltanet", "mamba2", "mom", "jrt")


def tokens(key: int, b: int, t: int) -> jax.Array:
  return jax.random.randint(jax.random.key(key), (b, t), 0, 260)


class Compiled:
  """Jitted forward / step / loss of one model, so repeated calls compile once per shape."""

  def __init__(self, model):
    self.model = model
    self.graphdef, self.state = nnx.split(model)
    gd = self.graphdef

    @functools.partial(jax.jit, static_argnames=("prefix_len",))
    def fwd(s, x, seg, prefix_len=None):
      return nnx.merge(gd, s)(x, segment_ids=seg, prefix_len=prefix_len)[0]

    @functools.partial(jax.jit, static_argnames=("prefix",))
    def step(s, x, dec, prefix=False):
      return nnx.merge(gd, s).step(x, dec, prefix=prefix)

    self._fwd, self._step = fwd, step

  def __call__(self, x, segment_ids=None, prefix_len=None):
    return self._fwd(self.state, x, segment_ids, prefix_len=prefix_len)

  def step(self, x, dec, prefix=False):
    return self._step(self.state, x, dec, prefix=prefix)

  def init_state(self, batch, max_len=None):
    return self.model.init_state(batch, max_len)


def check_causal(h: Compiled, x: jax.Array, t: int = 13, **kw) -> None:
  """Changing token t never moves logits before t (and does move later ones)."""
  y = x.at[:, t].set((x[:, t] + 1) % 260)
  a, b = h(x, **kw), h(y, **kw)
  np.testing.assert_allclose(a[:, :t], b[:, :t], atol=TOL["causal"])
  assert np.abs(np.asarray(a[:, t:] - b[:, t:])).max() > 1e-4


def check_decode(h: Compiled, x: jax.Array, prefill: int = 7) -> None:
  """Chunked prefill then token-by-token decoding reproduces the full forward."""
  full = h(x)
  dec = h.model.init_state(x.shape[0], x.shape[1] + 4)
  logits, dec = h.step(x[:, :prefill], dec)
  outs = [logits]
  for t in range(prefill, x.shape[1]):
    logits, dec = h.step(x[:, t : t + 1], dec)
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=TOL["decode"])
  assert dec["lengths"].tolist() == [x.shape[1]] * x.shape[0]


def check_packed(h: Compiled, x: jax.Array) -> None:
  """Two documents packed in a row with segment ids equal two separate calls."""
  n = x.shape[1] // 2
  seg = jnp.concatenate([jnp.ones_like(x[:, :n]), 2 * jnp.ones_like(x[:, n:])], axis=1)
  packed = h(x, segment_ids=seg.astype(jnp.int32))
  np.testing.assert_allclose(packed[:, :n], h(x[:, :n]), atol=TOL["packed"])
  np.testing.assert_allclose(packed[:, n:], h(x[:, n:]), atol=TOL["packed"])


def check_constant_state(model) -> None:
  """The decode state does not grow with the context (so neither does the cost per token).

  The state after 3 and after 40 decoded tokens (past the ``max_len`` it was built for) has
  the initial state's shapes, and it carries the context: the two states differ.
  """
  shapes = lambda s: jax.tree.map(jnp.shape, s)
  start = model.init_state(2, 16)
  x = tokens(11, 2, 40)
  _, short = step_fn(model)(x[:, :3], start)
  _, long = step_fn(model)(x, start)
  assert shapes(short) == shapes(long) == shapes(start)
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b), initial=0.0)), short, long)
  assert max(jax.tree.leaves(diff)) > 1e-4
  assert model.state_size() is not None and model.state_size() > 0


def check_gradients(model, x: jax.Array, **call_kwargs) -> None:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(x, **call_kwargs)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0]
    return jnp.mean(nll)

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.abs(g).max() > 0, f"zero gradient at {jax.tree_util.keystr(path)}"


def train_mqar(cfg, steps: int = 200) -> dict:
  """A short MQAR run (length 32, 4 pairs, 16 values); returns ``train_on_task``'s result."""
  from pipelines.tasks.mqar import MQAR
  from pipelines.tasks.training import Budget, train_on_task

  kw = {"length": 32, "num_pairs": 4, "token_range": (0, 32)}
  train, held_out = MQAR(seed=0, **kw), MQAR(seed=1, num_examples=128, **kw)
  return train_on_task(cfg, train, held_out, Budget(steps=steps, batch_size=32, eval_examples=128))


# ----- tests of the shared pieces -------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_presets_build_with_logical_axes(name):
  for preset in ("small", "base"):
    assert zoo.config(name, preset).family == name
  # Building the big presets would only re-trace the same layers, slowly on CPU.
  abstract = nnx.eval_shape(lambda: zoo.build(zoo.config(name, "tiny"), rngs=0))
  params = nnx.state(abstract, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) > 0
  specs = nnx.get_partition_spec(params)
  leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert leaves and all(len(s) >= 1 for s in leaves)


@pytest.mark.parametrize(
  "name, bad, field",
  [
    ("based", {"feature_dim": 0}, "feature_dim"),
    ("based", {"attention_layers": (5,)}, "attention_layers"),
    ("deltanet", {"chunk_size": 12}, "chunk_size"),
    ("gated_deltanet", {"conv_width": -1}, "conv_width"),
    ("mamba2", {"head_dim": 24}, "head_dim"),
    ("mom", {"top_k": 5}, "top_k"),
    ("jrt", {"window": 0}, "window"),
    ("gated_deltanet", {"a_init_range": (2.0, 1.0)}, "a_init_range"),
    ("mamba2", {"a_init_range": (-1.0, 16.0)}, "a_init_range"),
    ("mom", {"dt_init_range": (0.0, 0.1)}, "dt_init_range"),
  ],
)
def test_bad_config_names_the_field(name, bad, field):
  with pytest.raises(ValueError, match=field):
    zoo.config(name, "tiny", **bad)
  with pytest.raises(ValueError, match="did you mean"):
    zoo.config(name, "tiny", d_modle=3)


def test_short_conv_step_matches_forward_and_respects_segments():
  conv = ShortConv((3, 2), ("heads", "head_dim"), 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 11, 3, 2))
  seg = jnp.array([[1] * 6 + [2] * 5] * 2, jnp.int32)

  @nnx.jit
  def run(conv, x, seg):
    state = conv.init_state(2, x.dtype)
    outs = []
    for a, b in ((0, 5), (5, 6), (6, 11)):
      y, state = conv.step(x[:, a:b], state)
      outs.append(y)
    parts = (conv(x[:, :6]), conv(x[:, 6:]))
    return conv(x), jnp.concatenate(outs, 1), conv(x, seg), jnp.concatenate(parts, 1)

  full, stepped, packed, separate = run(conv, x, seg)
  np.testing.assert_allclose(stepped, full, atol=TOL["conv"])
  np.testing.assert_allclose(packed, separate, atol=TOL["conv"])
  # An explicit convolution for one channel: y_t = silu(sum_j w_j x_{t-3+j}).
  w = np.asarray(conv.weight[...][:, 1, 0])
  xp = np.pad(np.asarray(x[0, :, 1, 0]), (3, 0))
  pre = np.stack([np.dot(w, xp[t : t + 4]) for t in range(11)])
  np.testing.assert_allclose(full[0, :, 1, 0], pre / (1 + np.exp(-pre)), atol=TOL["conv"])


def test_decay_init_follows_mamba2():
  # Mamba-2 / gated DeltaNet (and MoM, which reuses it): A ~ U(1, 16) stored as log A;
  # softplus(dt_bias) log-uniform in [1e-3, 0.1] (dt_bias = inverse softplus of dt).
  a_log, dt_bias = decay_params(nnx.Rngs(3), 256)
  a = np.exp(np.asarray(a_log[...], np.float64))
  dt = np.log1p(np.exp(np.asarray(dt_bias[...], np.float64)))
  assert np.all((a >= 1.0) & (a <= 16.0)) and abs(a.mean() - 8.5) < 1.0, a
  assert np.all((dt >= 1e-3 * (1 - 1e-4)) & (dt <= 0.1 * (1 + 1e-4))), dt
  assert abs(np.log(dt).mean() - np.log(1e-2)) < 0.3  # log-uniform: mean log is the midpoint


def test_decay_init_ranges_reach_every_decay_family():
  """``a_init_range`` / ``dt_init_range`` (fla's and mamba_ssm's ``A_init_range``, ``dt_min``,
  ``dt_max``) set the initial decay of gated DeltaNet, Mamba-2 and MoM; the default stays
  Mamba-2's U(1, 16) with the same draws as ``decay_params`` without ranges."""
  a_log, dt_bias = decay_params(nnx.Rngs(3), 64, (0.0, 2.0), (1e-4, 1e-3))
  a = np.exp(np.asarray(a_log[...], np.float64))
  dt = np.log1p(np.exp(np.asarray(dt_bias[...], np.float64)))
  assert np.all(np.isfinite(a_log[...])) and np.all((a >= 0) & (a <= 2.0)), a
  assert np.all((dt >= 1e-4 * (1 - 1e-3)) & (dt <= 1e-3 * (1 + 1e-3))), dt
  default = decay_params(nnx.Rngs(3), 64)
  same = decay_params(nnx.Rngs(3), 64, (1.0, 16.0), (1e-3, 1e-1))
  for x, y in zip(default, same):
    np.testing.assert_array_equal(x[...], y[...])

  for name, extra in (("gated_deltanet", {}), ("mamba2", {}), ("mom", {"n_memories": 2})):
    params = {}
    for label, ranges in (("default", {}), ("slow", {"a_init_range": (1.0, 1.0)})):
      model = zoo.build(zoo.config(name, "tiny", **extra, **ranges), rngs=0)
      state = nnx.state(model, nnx.Param)
      logs = [
        np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(state)
        if "a_log" in jax.tree_util.keystr(p)
      ]
      assert logs, f"{name} has no a_log"
      params[label] = np.concatenate([x.ravel() for x in logs])
    np.testing.assert_array_equal(params["slow"], 0.0)  # A = 1 in every head and layer
    assert params["default"].std() > 0.3, (name, params["default"])  # U(1, 16) spreads


def test_gated_delta_layer_matches_a_numpy_recurrence():
  """The gated DeltaNet mixer against the paper's recurrence written directly in numpy:
  ``S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T`` with
  ``a_t = exp(-exp(A_log) softplus(x_t W_a + dt_bias))`` applied once per step, and
  ``o_t = K^-1/2 S_t^T q_t`` (catches a decay applied twice, a wrong sign or gates on the wrong
  axis)."""
  H, K = 2, 4
  layer = LinearAttention(
    16, H, K, K, feature_map="l2", rule="delta", decay="gated", conv_width=3, rngs=nnx.Rngs(0)
  )
  x = jax.random.normal(jax.random.key(1), (2, 9, 16))
  _, aux = layer(x)
  q, k, v = layer._inputs(x)
  q, k, v = (layer.conv[n](t) for n, t in (("q", q), ("k", k), ("v", v)))
  q, k, v = (np.asarray(t, np.float64) for t in layer._features(q, k, v))
  x64 = np.asarray(x, np.float64)
  pre = x64 @ np.asarray(layer.w_a[...], np.float64) + np.asarray(layer.dt_bias[...], np.float64)
  alpha = np.exp(-np.exp(np.asarray(layer.a_log[...], np.float64)) * np.log1p(np.exp(pre)))
  beta = 1 / (1 + np.exp(-np.einsum("btd,dh->bth", x64, np.asarray(layer.w_beta[...]))))
  state = np.zeros((2, H, K, K))
  outs = []
  for t in range(x.shape[1]):
    decayed = alpha[:, t, :, None, None] * state
    err = v[:, t] - np.einsum("bhkv,bhk->bhv", decayed, k[:, t])
    state = decayed + beta[:, t, :, None, None] * np.einsum("bhk,bhv->bhkv", k[:, t], err)
    outs.append(np.einsum("bhkv,bhk->bhv", state, q[:, t]) * K**-0.5)
  np.testing.assert_allclose(aux["state"], state, atol=1e-5)
  o = jnp.asarray(np.stack(outs, 1), jnp.float32)
  np.testing.assert_allclose(layer(x)[0], layer._output(x, o), atol=1e-5)


def test_taylor_features_give_the_exp_expansion():
  q = jax.random.normal(jax.random.key(2), (5, 8))
  k = jax.random.normal(jax.random.key(3), (5, 8))
  dot = jnp.sum(q * k, -1) / math.sqrt(8)
  got = jax.jit(lambda a, b: jnp.sum(taylor(a) * taylor(b), -1))(q, k)
  np.testing.assert_allclose(got, 1 + dot + dot**2 / 2, rtol=TOL["feature"], atol=TOL["feature"])
  assert taylor(q).shape == (5, 1 + 8 + 64)


def test_router_picks_top_k_and_renormalises():
  logits = jax.random.normal(jax.random.key(4), (2, 7, 5))
  weights, probs = jax.jit(route, static_argnums=1)(logits, 2)
  assert np.all(np.sum(np.asarray(weights) > 0, -1) == 2)
  np.testing.assert_allclose(np.sum(weights, -1), 1.0, atol=1e-6)
  best = np.argmax(np.asarray(probs), -1)
  assert np.all(np.take_along_axis(np.asarray(weights), best[..., None], -1) > 0)


@pytest.mark.parametrize("window, conv", [(3, 0), (3, 3), (None, 3)])
def test_window_attention_shift_buffer_matches_masked_attention(window, conv):
  # The decode path keeps only `window` keys; it must equal the op's sliding-window mask,
  # also when one chunk is longer than the window. With q/k/v convolutions their buffers carry
  # across chunks too.
  mixer = AttentionMixer(16, 2, 8, window=window, conv_width=conv, rngs=nnx.Rngs(5))
  x = jax.random.normal(jax.random.key(6), (2, 10, 16))

  @nnx.jit
  def run(mixer, x):
    positions = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
    full, _ = mixer(x, positions=positions)
    state = mixer.init_state(2, 10, x.dtype)
    lengths = jnp.zeros((2,), jnp.int32)
    outs = []
    for a, b in ((0, 5), (5, 6), (6, 10)):
      y, state = mixer.step(x[:, a:b], state, lengths=lengths)
      lengths = lengths + (b - a)
      outs.append(y)
    return full, jnp.concatenate(outs, 1), state

  full, stepped, state = run(mixer, x)
  np.testing.assert_allclose(stepped, full, atol=TOL["decode"])
  assert state["k"].shape[1] == (window or 10)
  assert ("conv" in state) == bool(conv)


def test_mqar_table_markdown_orders_rows():
  from pipelines.evaluation.mqar_table import VARIANTS, to_markdown

  assert {v.family for v in VARIANTS} >= set(FAMILIES) | {"transformer"}
  row = dict(overrides={}, params=10, chance=1 / 16, seconds=1.0)
  rows = [
    {**row, "label": "based", "state": 200, "accuracy": 0.5},
    {**row, "label": "based", "state": 100, "accuracy": 0.4},
    {**row, "label": "transformer", "state": None, "accuracy": 0.9},
  ]
  lines = to_markdown(rows).splitlines()
  assert lines[2].startswith("| transformer |") and "KV cache" in lines[2]
  assert "| 100 |" in lines[3] and "| 200 |" in lines[4]
  assert lines[-1] == "Chance: 0.062."
  # Seeds of one variant become one line: their mean, range and count.
  seeds = [
    {**row, "label": "based", "state": 100, "accuracy": a, "seed": i}
    for i, a in enumerate((0.2, 0.6))
  ]
  lines = to_markdown(seeds).splitlines()
  assert len(lines) == 5 and "| 0.400 (0.20-0.60, 2 seeds) |" in lines[2]


def test_mqar_table_merges_rows_of_separate_runs(tmp_path):
  from pipelines.evaluation.mqar_table import main, save_rows

  row = dict(params=10, chance=1 / 16, seconds=1.0)
  save_rows(
    [{**row, "label": "based", "overrides": {"feature_dim": 4}, "state": 100, "accuracy": 0.5}],
    tmp_path / "a.json",
  )
  save_rows(
    [{**row, "label": "transformer", "overrides": {}, "state": None, "accuracy": 0.9}],
    tmp_path / "b.json",
  )
  table = main(
    ["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "t.md")]
  )
  lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
  assert [line.split(" | ")[0] for line in lines] == ["| transformer", "| based"]
  assert "feature_dim=4" in lines[1] and "| 0.500 |" in lines[1]
  assert (tmp_path / "t.md").read_text() == table


@pytest.mark.slow
def test_mqar_table_trains_and_scores():
  from pipelines.evaluation.mqar_table import mqar_table
  from pipelines.tasks.training import Budget

  rows = mqar_table(
    budget=Budget(steps=3, batch_size=4, eval_examples=8),
    length=16,
    num_pairs=2,
    token_range=(0, 16),
    families=("mamba2",),
  )
  # Two state sizes with Mamba-2's initial decay, then the same two with the slow one.
  assert [r["label"] for r in rows] == ["mamba2"] * 4
  assert rows[0]["state"] < rows[1]["state"] and rows[2]["state"] < rows[3]["state"]
  # Each row's accuracy is that of training and scoring the same model and seed directly.
  from pipelines.evaluation.mqar_table import VARIANTS
  from pipelines.tasks.mqar import MQAR
  from pipelines.tasks.training import train_on_task

  kw = dict(length=16, num_pairs=2, token_range=(0, 16), power_a=None)
  for row, v in zip(rows, [v for v in VARIANTS if v.label == "mamba2"]):
    cfg = zoo.config("mamba2", "tiny", **{"chunk_size": 16, **v.overrides})
    want = train_on_task(
      cfg,
      MQAR(seed=0, **kw),
      MQAR(seed=10_000, num_examples=8, **kw),
      Budget(steps=3, batch_size=4, eval_examples=8),
      seed=0,
    )
    assert row["accuracy"] == want["accuracy"] and row["chance"] == want["chance"]
