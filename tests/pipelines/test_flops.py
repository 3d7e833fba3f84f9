"""Model FLOPs from shapes (the MFU of ``memzoo bench model``) against a hand count."""

from flax import nnx

import zoo
from pipelines.bench.flops import model_forward_flops, train_step_flops


def transformer_hand_count(c, batch: int, length: int) -> float:
  """Forward matmul FLOPs of the Llama-style transformer, written out layer by layer."""
  dh = c.head_dim or c.d_model // c.n_heads
  t = length
  qkv = 2 * t * c.d_model * (c.n_heads + 2 * c.n_kv_heads) * dh
  out = 2 * t * c.n_heads * dh * c.d_model
  causal_pairs = t * (t + 1) // 2  # query i sees keys 0..i
  scores_and_values = 2 * 2 * dh * c.n_heads * causal_pairs
  mlp = 3 * 2 * t * c.d_model * c.d_ff  # SwiGLU: gate, up, down
  logits = 2 * t * c.d_model * c.vocab_size
  return batch * (c.n_layers * (qkv + out + scores_and_values + mlp) + logits)


def test_transformer_flops_equal_the_hand_count():
  c = zoo.config("transformer", preset="tiny", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                 d_ff=64)  # fmt: skip
  model = zoo.build(c, rngs=nnx.Rngs(0))
  batch, length = 2, 48
  want = transformer_hand_count(c, batch, length)
  assert model_forward_flops(model, batch, length) == want
  assert train_step_flops(model, batch, length) == 3 * want


def test_sliding_window_counts_only_visible_pairs():
  """A window mask's attention FLOPs shrink with the window (the kernels skip those blocks)."""
  base = dict(preset="tiny", n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)
  full = zoo.build(zoo.config("transformer", **base), rngs=nnx.Rngs(0))
  windowed = zoo.build(zoo.config("transformer", window=8, **base), rngs=nnx.Rngs(0))
  t, dh = 48, 8
  hidden = sum(t - i - 8 for i in range(t - 8))  # causal pairs at distance >= 8
  diff = model_forward_flops(full, 1, t) - model_forward_flops(windowed, 1, t)
  assert diff == 2 * 2 * dh * 4 * hidden
