"""InfLLM: chunked forward == token decode past the window, retrieval, checkpointed weights."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import zoo
from zoo.infllm import from_transformer
from zoo.infllm import store as host_store

# Float32 everywhere; differences come from summation order and lse merging only.
ATOL = 2e-4


def backbone(**kw):
  small = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2}
  return zoo.config("transformer", "tiny", **{**small, **kw})


def infllm(**kw):
  base = {"backbone": backbone(), "sinks": 2, "window": 6, "block_size": 4, "n_repr": 2}
  return zoo.config("infllm", "tiny", **{**base, "top_k": 8, "chunk_size": 12, **kw})


def tokens(seed, b, t):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 260)


def jitted(model):
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  step = jax.jit(lambda s, x, st: nnx.merge(graphdef, s).step(x, st))
  return (lambda x: fwd(state, x)), (lambda x, st: step(state, x, st)), step


def test_token_decode_matches_chunked_forward_with_full_retrieval():
  # 36 tokens, window 6, blocks of 4: 7 memory blocks, all retrieved (top_k 8), so tokens
  # are equally visible whether still pending or committed and the two orders agree exactly.
  model = zoo.build(infllm(), rngs=1)
  x = tokens(1, 2, 36)
  fwd, step, raw = jitted(model)
  full, aux = fwd(x)
  assert aux["memory_blocks"].tolist() == [7, 7]
  state = model.init_state(2, 36)
  outs = []
  for t in range(36):
    logits, state = step(x[:, t : t + 1], state)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=ATOL)
  assert raw._cache_size() == 1


def test_equals_checkpointed_transformer_while_window_covers_context(tmp_path):
  source = zoo.build(backbone(), rngs=2)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "params", nnx.state(source, nnx.Param))
  ckpt.wait_until_finished()
  fresh = zoo.build(backbone(), rngs=99)
  nnx.update(fresh, ckpt.restore(tmp_path / "params", nnx.state(fresh, nnx.Param)))
  model = from_transformer(fresh, sinks=2, window=16, block_size=4, n_repr=2, chunk_size=8)
  x = tokens(2, 2, 16)
  ref = jax.jit(lambda v: source(v)[0])(x)
  np.testing.assert_allclose(jitted(model)[0](x)[0], ref, atol=ATOL)


def test_top_k_selects_blocks():
  # Fewer retrieved blocks must change the far-context output, but never the first tokens.
  x = tokens(3, 1, 36)
  full = jitted(zoo.build(infllm(top_k=8), rngs=3))[0](x)[0]
  sparse = jitted(zoo.build(infllm(top_k=1), rngs=3))[0](x)[0]
  # queries before the first committed block (position < sinks + window + block_size) agree
  np.testing.assert_allclose(sparse[:, :11], full[:, :11], atol=ATOL)
  assert np.abs(np.asarray(sparse[:, 20:] - full[:, 20:])).max() > 1e-4


def test_causal_and_gradients():
  # One 24-token chunk (4 committed blocks by the end): retrieval is in play, no scan.
  model = zoo.build(infllm(chunk_size=24), rngs=4)
  x = tokens(4, 2, 24)
  y = x.at[:, 15].set((x[:, 15] + 1) % 260)
  both = jitted(model)[0](jnp.concatenate([x, y]))[0]
  np.testing.assert_allclose(both[:2, :15], both[2:, :15], atol=1e-6)
  assert np.abs(np.asarray(both[:2, 15:] - both[2:, 15:])).max() > 1e-4
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(x)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0]
    return jnp.mean(nll)

  grads = jax.jit(jax.grad(loss))(params)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_bad_config_names_field():
  with pytest.raises(ValueError, match="n_repr"):
    infllm(n_repr=9)
  with pytest.raises(ValueError, match="block_size"):
    infllm(block_size=0)
  with pytest.raises(ValueError, match="vocab_size"):
    infllm(vocab_size=7)


def state_bytes(state):
  return sum(x.nbytes for x in jax.tree.leaves(state))


def test_offload_matches_device_with_constant_device_state():
  # 48 tokens = 8 windows, top_k 2 of up to 10 blocks: retrieval is selective. The device
  # model runs its block-sparse forward with per-token retrieval (query_tile 1, as the
  # offloaded one, which decodes token by token).
  x = tokens(5, 2, 48)
  ref = jitted(zoo.build(infllm(top_k=2, query_tile=1), rngs=5))[0](x)[0]
  model = zoo.build(infllm(top_k=2, offload=True), rngs=5)
  _, step, raw = jitted(model)
  state = model.init_state(2)
  store = host_store.get_store(state["store"])
  outs, seen = [], {}
  for t in range(48):
    if t == 12:
      old, seen[12] = state, (state_bytes(state), store.nbytes)
    logits, state = step(x[:, t : t + 1], state)
    outs.append(logits)
  seen[48] = (state_bytes(state), store.nbytes)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), ref, atol=ATOL)
  assert raw._cache_size() == 1
  # device state: same bytes at length 12 and 48; the host store holds the 10 blocks
  assert seen[12][0] == seen[48][0]
  assert store.counts.tolist() == [[10, 10], [10, 10]]
  assert seen[48][1] > seen[12][1]
  with pytest.raises(Exception, match="stale decode state"):
    jax.block_until_ready(step(x[:, 12:24], old))
  mixed = {**state, "store": model.init_state(1)["store"]}
  with pytest.raises(Exception, match="opened for batch 1"):
    jax.block_until_ready(step(x[:, :1], mixed))
  model.release_state(state)
  with pytest.raises(Exception, match="no host block store"):
    jax.block_until_ready(step(x[:, :1], state))


def test_offload_refuses_gradients():
  model = zoo.build(infllm(offload=True), rngs=6)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = tokens(6, 1, 24)
  with pytest.raises(ValueError, match="inference-only"):
    jax.grad(lambda p: nnx.merge(graphdef, p, rest)(x)[0].sum())(params)


EMLLM = {"segmentation": "surprise", "min_event": 2, "refine": 1, "neighbours": 1}


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, EMLLM], ids=["infllm", "emllm"])
def test_trains_on_mqar_beyond_chance(options):
  # The pairs sit in the first 8 tokens (memory block 0, no sinks) and the window is 16
  # tokens: block 0 is committed for queries at p >= 8 + 16 - 1 = 23, which can recall only
  # through retrieval. Accuracy is checked on those queries alone.
  from pipelines.tasks import MQAR
  from pipelines.tasks.training import Budget, train_on_task

  bb = zoo.config("transformer", "tiny", d_model=64, d_ff=128)
  cfg = zoo.config(
    "infllm", "tiny", backbone=bb, sinks=0, window=16, block_size=8, top_k=2, n_repr=2,
    chunk_size=16, **options,
  )  # fmt: skip
  train = MQAR(length=64, num_pairs=4, token_range=(0, 64), seed=0)
  evals = MQAR(length=64, num_pairs=4, token_range=(0, 64), seed=1)
  out = train_on_task(
    cfg, train, evals, Budget(steps=200, batch_size=16, lr=3e-3, eval_examples=64)
  )
  graphdef, _, rest = nnx.split(zoo.build(cfg, rngs=0), nnx.Param, ...)
  predict = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x)[0])
  ex = [evals[i] for i in range(64)]
  batch = {k: np.stack([e[k] for e in ex]) for k in ("inputs", "targets", "answer_spans")}
  pred = np.asarray(predict(out["params"], jnp.asarray(batch["inputs"]))).argmax(-1)
  far = (batch["answer_spans"] > 0) & (np.arange(64) >= 23)
  far_acc = float(np.mean(pred[far] == batch["targets"][far]))
  print(options, out["accuracy"], far_acc, int(far.sum()), out["chance"])
  assert far.sum() > 100 and far_acc > 3 * out["chance"]


def _tiled(**kw):
  # Blocks of 16 and query tiles of 16: the smallest the GPU kernel takes. 96 tokens, window
  # 16: 4 committed blocks by the end; top_k 1 makes the retrieval choice matter.
  bb = backbone(n_layers=1)
  base = {"backbone": bb, "sinks": 2, "window": 16, "block_size": 16, "n_repr": 2}
  return zoo.config("infllm", "tiny", **{**base, "top_k": 1, "chunk_size": 48, **kw})


def _forward_on(backend, cfg, x, monkeypatch):
  """The forward under the simulated ``backend`` (None: this CPU), and what served attention."""
  import ops.common

  if backend is None:
    monkeypatch.delenv(ops.common.SIMULATE_ENV, raising=False)
  else:
    monkeypatch.setenv(ops.common.SIMULATE_ENV, backend)
  ops.common.reset_served()
  model = zoo.build(cfg, rngs=5)
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v)[0])(state, x)
  return out, ops.common.served()["dot_product_attention"]


def test_query_tiles_reach_the_pallas_kernel_and_match_xla(monkeypatch):
  # Per-tile retrieval lists (16, 16) blocks, so the simulated GPU dispatch serves every
  # attention call with the Pallas kernel (interpreted) and it equals XLA on the same lists.
  x = tokens(6, 1, 96)
  got, record = _forward_on("gpu", _tiled(query_tile=16), x, monkeypatch)
  assert record["served"] == {"pallas_gpu": record["served"]["pallas_gpu"]}, record
  want, cpu = _forward_on(None, _tiled(query_tile=16), x, monkeypatch)
  assert set(cpu["served"]) == {"xla"}
  np.testing.assert_allclose(got, want, atol=ATOL)
  # Per-token lists ((1, 16) blocks) are below the kernel's query tile: XLA serves them, and
  # with top_k 1 per-token retrieval chooses other blocks than per-tile retrieval.
  per_token, record = _forward_on("gpu", _tiled(query_tile=1), x, monkeypatch)
  assert "pallas_gpu" in record["refused"] and record["served"].get("xla"), record
  assert np.abs(np.asarray(per_token - want)).max() > 1e-4
  # Tokens before the first committed block (p < sinks + window + block_size) retrieve nothing.
  np.testing.assert_allclose(per_token[:, :33], want[:, :33], atol=ATOL)


def test_query_tiles_with_full_retrieval_equal_per_token_retrieval(monkeypatch):
  # When top_k covers every block, the tiles change nothing: the kernel with tiles of 16
  # equals XLA with per-token retrieval (which equals token-by-token decode, above).
  x = tokens(7, 1, 96)
  got, record = _forward_on("gpu", _tiled(query_tile=16, top_k=8), x, monkeypatch)
  assert set(record["served"]) == {"pallas_gpu"}, record
  want, _ = _forward_on(None, _tiled(query_tile=1, top_k=8), x, monkeypatch)
  np.testing.assert_allclose(got, want, atol=ATOL)
