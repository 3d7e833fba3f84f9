"""``memzoo bench context``: the compiled train step's memory falls with remat and with context
sharding, and the longest-length solver inverts affine and quadratic byte curves."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from pipelines import cli
from pipelines.bench import context as bench

GIB = 2**30
BUDGET = 80 * GIB
LENGTHS = (1024, 2048, 4096)
# One layer at width 32: the smallest transformer whose step has the blocks remat acts on.
TINY = "transformer_tiny:model.n_layers=1,model.d_model=32,model.d_ff=64"


def test_affine_curve_solved_exactly():
  a, b = 3.0e9, 2.5e5
  fit = bench.fit_curve(LENGTHS, [a + b * t for t in LENGTHS])
  assert fit.kind == "affine"
  exact = (BUDGET - a) / b
  assert bench.longest_length(fit, BUDGET) == math.floor(exact)
  # Rounded down to whole quanta, never over the budget.
  assert bench.longest_length(fit, BUDGET, 1024) == math.floor(exact / 1024) * 1024


def test_quadratic_curve_solved_at_its_root():
  a, b, c = 1.0e8, 4.0e3, 8.0
  ys = [a + b * t + c * t * t for t in LENGTHS]
  fit = bench.fit_curve(LENGTHS, ys)
  assert fit.kind == "quadratic"
  t = bench.longest_length(fit, BUDGET)
  assert a + b * t + c * t * t <= BUDGET < a + b * (t + 1) + c * (t + 1) ** 2
  # Read as affine, the same points would promise a far longer sequence.
  slope, icpt = np.polyfit(LENGTHS, ys, 1)
  assert (BUDGET - icpt) / slope > 2 * t


def test_affine_noise_does_not_make_a_quadratic_and_edge_cases():
  a, b = 2.0e8, 1.0e5
  wobble = [1.0, -1.0, 1.0]  # a few KiB of buffer-packing noise on ~1 GB
  ys = [a + b * t + 4096 * w for t, w in zip(LENGTHS, wobble)]
  assert bench.fit_curve(LENGTHS, ys).kind == "affine"
  assert bench.longest_length(bench.Fit("affine", 2 * BUDGET, 1.0), BUDGET, 512) == 0
  assert bench.longest_length(bench.Fit("affine", 1e9, 0.0), BUDGET) is None


@pytest.mark.slow  # over 20 s on 2 cores (compiles several steps)
def test_remat_and_context_sharding_lower_the_step_memory():
  if jax.device_count() < 2:
    pytest.skip("needs 2 (simulated) devices; tests/conftest.py sets 8")
  temp = {}
  for policy, context in (("none", 1), ("full", 1), ("none", 2)):
    for t in (64, 128):
      m = bench.step_memory(TINY, t, policy, devices=2, context=context)
      assert m["bytes"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
      temp[policy, context, t] = m["temp"]
  for t in (64, 128):
    assert temp["full", 1, t] < temp["none", 1, t], temp
    assert temp["none", 2, t] < temp["none", 1, t], temp
  # Activations grow with T: the fit has a positive slope to solve.
  assert temp["none", 1, 128] > temp["none", 1, 64]


def test_bad_input_is_one_line(capsys):
  assert cli.main(["bench", "context", "--budget-gib", "0"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--budget-gib" in err[0]
  assert cli.main(["bench", "context", "no_such_recipe", "--devices", "1"]) == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_check_refits_a_curve_the_short_lengths_hide(monkeypatch):
  # Affine at the short lengths, with a T^2 term that only shows at long ones.
  a, b, c = 5.0e8, 9.0e4, 1.6e-2
  curve = lambda t: a + b * t + c * t * t  # noqa: E731
  monkeypatch.setattr(
    bench,
    "step_memory",
    lambda spec, t, policy, devices, context: {"bytes": curve(t), "compile_s": 0},
  )
  short = (2048, 8192)
  fit = bench.fit_curve(short, [curve(t) for t in short])
  assert fit.kind == "affine"
  row = {"lengths": list(short), "bytes": [curve(t) for t in short], "context": 1, "policy": "full"}
  row["fit"] = {"kind": fit.kind, "a": fit.a, "b": fit.b, "c": fit.c}
  row["longest_T"] = bench.longest_length(fit, BUDGET, 1024)
  bench._check(row, "unused", 1, BUDGET)
  first, last = row["checks"][0], row["checks"][-1]
  assert not first["fits"]  # the affine prediction is over the budget when compiled
  assert last["fits"] and row["verified"] and row["fit"]["kind"] == "quadratic"
  exact = (-b + math.sqrt(b * b - 4 * c * (a - BUDGET))) / (2 * c)
  assert exact - 2 * 1024 < row["longest_T"] <= exact
