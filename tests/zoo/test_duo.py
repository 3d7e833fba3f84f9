"""DuoAttention: per-head masks, decode == forward, constant streaming caches, gate recovery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from ops.attention import Mask
from zoo.duo import from_transformer, optimize_gates, retrieval_heads_from_gates

# Float32 everywhere; differences come from summation order and lse merging only.
ATOL = 2e-4


def backbone(**kw):
  small = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2, "max_len": 64}
  return zoo.config("transformer", "tiny", **{**small, **kw})


def duo(**kw):
  return zoo.config("duo", "tiny", **{"backbone": backbone(), "sinks": 2, "window": 5, **kw})


def tokens(seed, b, t):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 260)


def jitted(model):
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  step = jax.jit(lambda s, x, st: nnx.merge(graphdef, s).step(x, st))
  return (lambda x: fwd(state, x)), (lambda x, st: step(state, x, st)), step


@pytest.mark.parametrize("heads", [((1,), (0,)), ((), (0, 1))])
def test_decode_matches_forward(heads):
  model = zoo.build(duo(retrieval_heads=heads), rngs=1)
  x = tokens(1, 2, 21)
  fwd, step, _ = jitted(model)
  full = fwd(x)
  state = model.init_state(2, 32)
  logits, state = step(x[:, :8], state)
  outs = [logits]
  for t in range(8, 21):
    logits, state = step(x[:, t : t + 1], state)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=ATOL)


def test_forward_uses_per_head_masks():
  # Layer-by-layer the model must equal the backbone with the same per-head masks planted.
  heads = ((1,), (0,))
  model = zoo.build(duo(retrieval_heads=heads), rngs=2)
  ref = zoo.build(backbone(), rngs=2)
  stream = Mask(window=5, sinks=2)
  for block, keep in zip(ref.blocks, heads):
    block.attn.mask = tuple(Mask() if h in keep else stream for h in range(2))
  x = tokens(2, 2, 20)
  np.testing.assert_allclose(jitted(model)[0](x), jitted(ref)[0](x), atol=ATOL)
  # and every head full is the plain transformer
  plain = from_transformer(ref, sinks=2, window=5)
  np.testing.assert_allclose(
    jitted(plain)[0](x), jitted(zoo.build(backbone(), rngs=2))[0](x), atol=ATOL
  )


def test_streaming_heads_stay_constant_size():
  model = zoo.build(duo(retrieval_heads=((0,), (1,))), rngs=3)
  _, step, raw = jitted(model)
  state = model.init_state(1, 48)
  sizes = [x.shape for x in jax.tree.leaves(state)]
  stream_bytes = sum(x.nbytes for c in state["caches"] for x in jax.tree.leaves(c["stream"]))
  x = tokens(3, 1, 48)  # 48 tokens through 7-entry streaming caches
  for t in range(48):
    logits, state = step(x[:, t : t + 1], state)
  assert np.isfinite(np.asarray(logits)).all()
  assert [x.shape for x in jax.tree.leaves(state)] == sizes
  assert (
    sum(x.nbytes for c in state["caches"] for x in jax.tree.leaves(c["stream"])) == stream_bytes
  )
  assert state["caches"][0]["stream"]["win_k"].shape[1] == 4  # window - 1, not the stream
  assert raw._cache_size() == 1


def test_gate_optimisation_recovers_planted_retrieval_heads():
  # Planted model: in each layer only the listed KV heads see the whole context; the others
  # are sink+window heads. Gates distilled on passkey inputs must single out the planted ones.
  from pipelines.tasks import Passkey

  planted = ((2,), (0, 3))
  cfg = duo(backbone=backbone(n_heads=4, n_kv_heads=4), sinks=2, window=6)
  model = zoo.build(cfg, rngs=4)
  stream = Mask(window=6, sinks=2)
  for block, keep in zip(model.backbone.blocks, planted):
    block.attn.mask = tuple(Mask() if h in keep else stream for h in range(4))
  src = Passkey(length=100, num_digits=3, seed=0)  # 100 tokens: the shortest passkey prompt
  batches = [np.stack([src[i * 2 + j]["inputs"] for j in range(2)]) for i in range(40)]
  gates = optimize_gates(model, batches, lr=0.05, l1=0.05)
  assert retrieval_heads_from_gates(gates) == planted, gates


def test_causal_and_gradients():
  model = zoo.build(duo(retrieval_heads=((1,), (0,))), rngs=5)
  fwd, _, _ = jitted(model)
  x = tokens(5, 2, 16)
  y = x.at[:, 9].set((x[:, 9] + 1) % 260)
  both = fwd(jnp.concatenate([x, y]))
  np.testing.assert_allclose(both[:2, :9], both[2:, :9], atol=1e-6)
  assert np.abs(np.asarray(both[:2, 9:] - both[2:, 9:])).max() > 1e-4
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(x)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0]
    return jnp.mean(nll)

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in nnx.to_flat_state(grads):
    if path[-1] != "gates":  # gates only act in gate mode
      assert np.all(np.isfinite(g.value)) and np.abs(g.value).max() > 0, path


def test_bad_config_names_field():
  with pytest.raises(ValueError, match="retrieval_heads"):
    duo(retrieval_heads=((0,),))
  with pytest.raises(ValueError, match="retrieval_heads"):
    duo(retrieval_heads=((0,), (5,)))
  with pytest.raises(ValueError, match="window"):
    duo(window=0)


@pytest.mark.slow
def test_trains_on_mqar_beyond_chance():
  # One retrieval KV head per layer, the other streams with a 6-token window over 64 tokens:
  # recall of the pairs (first 8 tokens) from later queries goes through the retrieval heads.
  from pipelines.tasks import MQAR
  from pipelines.tasks.training import Budget, train_on_task

  bb = backbone(d_model=64, d_ff=128, max_len=64)
  cfg = duo(backbone=bb, window=6, retrieval_heads=((0,), (0,)))
  train = MQAR(length=64, num_pairs=4, token_range=(0, 64), seed=0)
  evals = MQAR(length=64, num_pairs=4, token_range=(0, 64), seed=1)
  out = train_on_task(
    cfg, train, evals, Budget(steps=200, batch_size=16, lr=3e-3, eval_examples=64)
  )
  print(out["accuracy"], out["chance"], out["first_loss"], out["last_loss"])
  assert out["accuracy"] > 3 * out["chance"]
