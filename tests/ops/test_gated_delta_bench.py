"""The memory benchmark (pipelines/bench/memory.py) at a tiny size."""

from __future__ import annotations

import pytest

from pipelines.bench.memory import bench_memory, format_table, run_cli


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


def test_bench_memory_neural_op_through_the_cli():
  # The neural memory's xla form and the reference at a tiny size, fwd+bwd: both rows timed.
  rows = run_cli(
    ["--op", "neural", "--impl", "xla", "reference", "--lengths", "16", "--heads", "1"]
    + ["--dim", "4", "--hidden", "8", "--chunk", "8", "--repeats", "1", "--backward"]
  )
  assert [(r["implementation"], r["T"], r["mode"]) for r in rows] == [
    ("xla", 16, "fwd+bwd"),
    ("reference", 16, "fwd+bwd"),
  ]
  assert all(r["time_s"] > 0 and r["skipped"] is None for r in rows)


def test_bench_memory_refuses_unknown_op():
  with pytest.raises(ValueError, match="unknown op"):
    bench_memory(lengths=(16,), op="titans")
