"""Document boundaries in packed rows, for every registered family.

A family either resets its memory and attention at every document start of ``segment_ids``
(two documents packed in one row give the logits of each document alone), or it is defined on
one stream (a memory without a reset) and refuses ``segment_ids``; the training loader then
feeds it one document per row (``PackedSequences(..., single_stream=True)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from pipelines.data.packing import PackedSequences
from tests.zoo.helpers import forward_fn

# Float32 throughout; the packed and the separate runs differ only in summation order.
TOL = 2e-4
LEN_A, LEN_B = 13, 11  # the boundary falls inside blocks, chunks and windows

# Tiny sizes (the test builds every family): fields of each family's "tiny" preset.
SMALL = {
  "transformer": dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64),
  "titans": dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, chunk_size=2),
  "atlas": dict(d_model=32, n_layers=1, n_heads=4, d_ff=64, chunk_size=2),
  "hope": dict(d_model=32, n_layers=1, n_heads=2, chunk_size=2, cms_hidden=32),
  # Windows shorter than a document, so that the sinks matter.
  "streaming": dict(sinks=2, window=4),
  "duo": dict(sinks=2, window=4),
}


def _model(name):
  cfg = zoo.config(name, "tiny", **SMALL.get(name, {}))
  if getattr(cfg, "dtype", "float32") != "float32":
    cfg = type(cfg)(**{**cfg.__dict__, "dtype": "float32"})
  return zoo.build(cfg, rngs=nnx.Rngs(0))


def _accepts(model) -> bool:
  return getattr(model, "accepts_segment_ids", True)


@pytest.fixture(scope="module")
def docs():
  a = jax.random.randint(jax.random.key(1), (1, LEN_A), 0, 256)
  b = jax.random.randint(jax.random.key(2), (1, LEN_B), 0, 256)
  return a, b


@pytest.mark.parametrize("name", zoo.list_models())
def test_packed_documents_equal_each_alone(name, docs):
  model = _model(name)
  a, b = docs
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.concatenate(
    [jnp.ones((1, LEN_A), jnp.int32), jnp.full((1, LEN_B), 2, jnp.int32)], axis=1
  )
  if not _accepts(model):
    # One stream per row: packed ids are refused with a message, not silently mixed.
    with pytest.raises(ValueError, match="one stream per row"):
      model(packed, segment_ids=segments)
    return
  f = forward_fn(model)
  got = np.asarray(f(packed, segments))
  alone_a, alone_b = np.asarray(f(a)), np.asarray(f(b))
  np.testing.assert_allclose(got[:, :LEN_A], alone_a, atol=TOL, rtol=TOL)
  np.testing.assert_allclose(got[:, LEN_A:], alone_b, atol=TOL, rtol=TOL)
  # The reset is what makes them equal: read as one stream, the second document differs.
  stream = np.asarray(f(packed))
  assert np.abs(stream[:, LEN_A:] - alone_b).max() > 100 * TOL


def _stream(doc_lengths):
  """A packed stream of documents ``[BOS] ... [EOS]`` with their document index."""
  tokens, ids = [], []
  for i, n in enumerate(doc_lengths):
    tokens += [256] + [(7 * i + j) % 256 for j in range(n - 2)] + [257]
    ids += [i] * n
  return np.asarray(tokens, np.uint16), np.asarray(ids, np.int32)


def test_single_stream_rows_hold_one_document():
  tokens, ids = _stream([30, 9, 50, 17])
  packed = PackedSequences(tokens, ids, 16)
  single = PackedSequences(tokens, ids, 16, single_stream=True)
  # Packed rows cross document starts; single-stream rows never do.
  assert any(len(set(packed[i]["segment_ids"])) > 1 for i in range(len(packed)))
  targets = []
  for i in range(len(single)):
    row = single[i]
    real = row["segment_ids"] == 1
    assert real[0] and np.all(np.diff(real.astype(int)) <= 0)  # the document, then padding
    assert np.all(row["loss_mask"][~real] == 0)
    targets.append(row["targets"][row["loss_mask"] > 0])
  # Every within-document target is trained exactly once, in order.
  starts = np.flatnonzero(np.diff(ids, prepend=-1))
  want = np.concatenate([d[1:] for d in np.split(tokens, starts[1:])])
  np.testing.assert_array_equal(np.concatenate(targets), want)
