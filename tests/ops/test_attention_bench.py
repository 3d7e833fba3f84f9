"""pipelines.bench.attention: rows for every (implementation, shape, mode), honest FLOP counts."""

from __future__ import annotations

import numpy as np

from ops.attention import Mask
from pipelines.bench.attention import Shape, bench_attention, format_table, visible_pairs


def test_visible_pairs_is_exact():
  for mask in (
    None,
    Mask(),
    Mask(window=7, sinks=3),
    Mask(prefix=11),
    Mask(window=4),
  ):
    t, s = 23, 40
    dense = (
      np.ones((t, s), bool)
      if mask is None
      else np.asarray(mask.visible(np.arange(s - t, s)[:, None], np.arange(s)[None]))
    )
    assert visible_pairs(mask, t, s) == int(dense.sum())


def test_bench_rows_and_table():
  shapes = [
    Shape("tiny causal", 1, 64, 2, 1, 16),
    Shape("tiny sink+window", 1, 64, 2, 2, 16, mask="sink_window"),
    Shape("tiny decode", 2, 1, 2, 1, 16, S=128, kind="decode"),
  ]
  rows = bench_attention(shapes, ["xla", "jax_cudnn"], dtype="float32", repeats=1)
  assert len(rows) == 2 * (2 + 2 + 1)
  ok = [r for r in rows if r["implementation"] == "xla"]
  assert all(r["error"] is None and r["time_ms"] > 0 and r["tflops"] > 0 for r in ok)
  assert all(r["peak_bytes"] is None or r["peak_bytes"] > 0 for r in ok)
  assert [r["gbps"] is not None for r in ok] == [False] * 4 + [True]
  # cuDNN does not exist on CPU: the row records why instead of crashing the benchmark.
  assert all(r["error"] for r in rows if r["implementation"] == "jax_cudnn")
  table = format_table(rows)
  assert table.count("\n") == len(rows) + 1 and "tiny decode" in table
