"""The memory benchmark (pipelines/bench_memory.py) at a tiny size."""

from __future__ import annotations

from pipelines.bench_memory import bench_memory, format_table


def test_bench_memory_rows_and_table():
  rows = bench_memory(
    lengths=(32, 64),
    implementations=("xla", "attention"),
    heads=1,
    key_dim=8,
    value_dim=8,
    chunk_size=16,
    repeats=1,
    max_attention_len=32,
    backward=True,
  )
  assert [(r["implementation"], r["T"]) for r in rows] == [
    ("xla", 32),
    ("xla", 64),
    ("attention", 32),
    ("attention", 64),
  ]
  for r in rows[:3]:
    assert r["time_s"] > 0 and r["tokens_per_s"] > 0 and r["skipped"] is None
    assert r["mode"] == "fwd+bwd"
    assert r["peak_bytes"] is None or r["peak_bytes"] > 0
  assert rows[3]["skipped"] and rows[3]["time_s"] is None
  table = format_table(rows).splitlines()
  assert len(table) == 2 + len(rows)
  assert "| xla | fwd+bwd | 64 |" in table[3] and "skipped" in table[5]
