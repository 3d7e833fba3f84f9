"""EM-LLM (InfLLM with surprise events): boundaries, refinement, neighbours, decode == forward."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import zoo
from tests.zoo.helpers import decode_all, forward_fn
from zoo.infllm import events, from_transformer
from zoo.infllm.store import retrieve

# Float32 everywhere; differences come from summation order and lse merging only.
ATOL = 2e-4


def np_modularity(adj, labels):
  deg = adj.sum(1)
  two_m = deg.sum()
  same = labels[:, None] == labels[None, :]
  return float(((adj - np.outer(deg, deg) / two_m) * same).sum() / two_m)


def labels_np(pos, e):
  return np.searchsorted(np.asarray(pos)[1:-1], np.arange(e), side="right")


def test_surprise_boundaries_follow_definition():
  # Calm surprises with planted spikes; token i is a boundary iff it exceeds mean + 1.5 std of
  # the tau surprises before it, then kept left to right with events >= min_event tokens.
  tau, e, gamma, min_event = 8, 32, 1.5, 4
  hist = 1.0 + 0.1 * (-1.0) ** np.arange(tau + e)  # calm: never 1.5 std above its window
  for i in (3, 5, 13, 14, 22, 30):  # span tokens (index tau + i)
    hist[tau + i] = 6.0
  valid = np.ones(tau + e, bool)
  valid[:2] = False  # before the stream
  flags = np.asarray(events.surprise_flags(jnp.asarray(hist, jnp.float32), valid, tau, gamma))
  want = np.zeros(e, bool)
  for i in range(e):
    w, ok = hist[i : i + tau], valid[i : i + tau]
    want[i] = hist[tau + i] > w[ok].mean() + gamma * w[ok].std()
  np.testing.assert_array_equal(flags, want)
  assert np.flatnonzero(flags).tolist() == [3, 5, 13, 14, 22, 30]
  pos = np.asarray(events.greedy_boundaries(jnp.asarray(flags), min_event, e // min_event))
  # 3 is too close to the start, 14 to 13, and 30 would leave an event of 2 tokens at the end
  kept = [int(p) for p in pos[1:-1] if p < e]
  assert kept == [5, 13, 22]
  assert pos[0] == 0 and pos[-1] == e and len(pos) == e // min_event + 1


def test_refinement_never_lowers_modularity():
  rng = np.random.default_rng(1)
  e, min_event = 24, 3
  refine = jax.jit(lambda a, p: events.refine_boundaries(a, p, 3, min_event))
  for _ in range(4):
    adj = np.asarray(events.key_adjacency(jnp.asarray(rng.standard_normal((e, 2, 8)))))
    cuts = np.sort(rng.choice(np.arange(1, e), 3, replace=False))
    flags = np.zeros(e, bool)
    flags[cuts] = True
    pos = events.greedy_boundaries(jnp.asarray(flags), min_event, e // min_event)
    new = refine(jnp.asarray(adj), pos)
    before = np_modularity(adj, labels_np(pos, e))
    after = np_modularity(adj, labels_np(new, e))
    assert after >= before - 1e-6
    assert np.isclose(
      after, float(events.modularity(jnp.asarray(adj), jnp.asarray(labels_np(new, e)))), atol=1e-5
    )
  # Planted communities [0,8), [8,16), [16,24): boundaries placed 2 off move back.
  keys = np.zeros((e, 1, 3))
  for c in range(3):
    keys[8 * c : 8 * (c + 1), 0, c] = 1.0
  keys += 0.05 * rng.standard_normal(keys.shape)
  adj = events.key_adjacency(jnp.asarray(keys, jnp.float32))
  pos = jnp.array([0, 10, 14, e, e, e, e, e, e], jnp.int32)
  new = np.asarray(refine(adj, pos))
  assert new[:4].tolist() == [0, 8, 16, e]


def test_retrieval_adds_temporal_neighbours():
  # 3 spans of 2 event slots; span 1 has one event only (its second slot is empty). The query
  # matches event (1, 0) only; with neighbours=1 the events just before and after it in time,
  # (0, 1) and (2, 0), are gathered too, skipping the empty slot.
  n, q, e, kh, dh = 3, 2, 4, 1, 4
  pos = np.array([[0, 2, 4], [0, 4, 4], [0, 2, 4]], np.int32)[None]
  reps = np.zeros((1, n, q, 1, kh, dh), np.float32)
  reps[0, 1, 0, 0, 0, 0] = 5.0
  for g in range(n):
    for j in range(q):
      reps[0, g, j, 0, 0, 1] = 0.1 * (g * q + j)  # small distinct scores elsewhere
  keys = np.arange(n * e * kh * dh, dtype=np.float32).reshape(1, n, e, kh, dh)
  store = {"keys": keys, "values": keys + 0.5, "pos": pos, "reps": reps}
  qg = np.zeros((1, 1, kh, dh), np.float32)
  qg[..., 0] = 1.0
  committed = np.array([[3]])

  def picked(xp, neighbours, n_sel):
    s = {k: xp.asarray(v) for k, v in store.items()}
    _, gv, vis = retrieve(xp, s, xp.asarray(qg), xp.asarray(committed), 1, neighbours, n_sel)
    gv, vis = np.asarray(gv), np.asarray(vis)
    return sorted(set(gv[0, 0, 0][vis[0, 0, 0], 0].tolist()))

  tok = lambda g, i: float(keys[0, g, i, 0, 0] + 0.5)  # noqa: E731
  assert picked(np, 0, 1) == [tok(1, i) for i in range(4)]
  want = sorted([tok(0, 2), tok(0, 3)] + [tok(1, i) for i in range(4)] + [tok(2, 0), tok(2, 1)])
  assert picked(np, 1, 3) == want
  assert picked(jnp, 1, 3) == want
  # a span not yet committed for the query is never gathered, neighbour or not
  committed[:] = 2
  assert picked(np, 1, 3) == sorted([tok(0, 2), tok(0, 3)] + [tok(1, i) for i in range(4)])


def backbone(**kw):
  small = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2}
  return zoo.config("transformer", "tiny", **{**small, **kw})


def emllm(**kw):
  base = {"backbone": backbone(), "sinks": 2, "window": 8, "block_size": 8, "n_repr": 2}
  base |= {"min_event": 2, "surprise_window": 6, "surprise_gamma": 0.5, "refine": 1}
  return zoo.config(
    "infllm", "emllm_tiny", **{**base, "top_k": 2, "neighbours": 1, "chunk_size": 8, **kw}
  )


def test_decode_matches_forward_and_causal():
  # 56 tokens = 7 windows; the forward steps 8 tokens at a time, decode 1 at a time. Row 1
  # differs from row 0 at position 30 only.
  x = jax.random.randint(jax.random.key(7), (1, 56), 0, 260)
  x = jnp.concatenate([x, x.at[:, 30].set((x[:, 30] + 1) % 260)])
  model = zoo.build(emllm(), rngs=7)
  full = forward_fn(model)(x)
  dec, state = decode_all(model, x, 56)
  np.testing.assert_allclose(dec, full, atol=ATOL)
  # the same events kept in host memory give the same logits
  offloaded = forward_fn(zoo.build(emllm(offload=True), rngs=7))(x)
  np.testing.assert_allclose(offloaded, full, atol=ATOL)
  np.testing.assert_allclose(full[0, :30], full[1, :30], atol=1e-6)
  assert np.abs(np.asarray(full[0, 30:] - full[1, 30:])).max() > 1e-4
  # segmentation really happened: 5 committed spans of 8 tokens hold more than 5 events
  pos = np.asarray(state["caches"][0]["pos"][0])
  n_events = int((pos[:, :-1] < pos[:, 1:]).sum())
  assert 5 < n_events <= 5 * 4


def test_gradients_and_checkpointed_backbone(tmp_path):
  source = zoo.build(backbone(), rngs=8)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "params", nnx.state(source, nnx.Param))
  ckpt.wait_until_finished()
  fresh = zoo.build(backbone(), rngs=99)
  nnx.update(fresh, ckpt.restore(tmp_path / "params", nnx.state(fresh, nnx.Param)))
  cfg = emllm()
  options = {k: getattr(cfg, k) for k in ("sinks", "block_size", "n_repr", "min_event")}
  options |= {"segmentation": "surprise", "refine": 1, "neighbours": 1, "chunk_size": 16}
  # while the window covers the context it is the restored transformer
  model = from_transformer(fresh, window=16, **options)
  x = jax.random.randint(jax.random.key(8), (2, 16), 0, 260)
  np.testing.assert_allclose(forward_fn(model)(x), jax.jit(lambda v: source(v)[0])(x), atol=ATOL)
  # past it, with memory in play, gradients are finite
  model = from_transformer(fresh, window=8, **{**options, "chunk_size": 8})
  x = jax.random.randint(jax.random.key(9), (1, 40), 0, 260)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(x)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  grads = jax.jit(jax.grad(loss))(params)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
