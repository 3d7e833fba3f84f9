"""InfLLM: chunked forward == token decode past the window, retrieval, checkpointed weights."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import zoo
from zoo.infllm import from_transformer

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
