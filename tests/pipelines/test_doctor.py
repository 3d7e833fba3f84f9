"""``memzoo doctor``: its CPU form checks kernels against the reference and catches a wrong one."""

import dataclasses
import subprocess
import sys

import pytest

from pipelines.bench import doctor


def test_one_row_passes_and_a_wrong_kernel_fails():
  check = next(c for c in doctor.checks_for("cpu") if c.name == "attention causal")
  assert check.implementations == ("reference", "pallas_gpu", "xla")
  check = dataclasses.replace(check, implementations=("reference", "pallas_gpu"))
  rows = doctor.run_checks([check], timed=False)
  assert [r["status"] for r in rows] == ["reference", "pass"], rows
  tol = doctor.TOLERANCES[("attention", "float32")]
  assert rows[1]["err_out"] <= tol["out"] and rows[1]["err_grad"] <= tol["grad"]

  # An implementation whose output is off by 1e-3 of its scale must fail the check.
  def off(impl, q, k, v):
    o = check.run(impl, q, k, v)
    return o * (1.0 + 1e-3 * (impl == "xla"))

  wrong = dataclasses.replace(check, run=off, implementations=("reference", "xla"))
  rows = doctor.run_checks([wrong], timed=False)
  assert [r["status"] for r in rows] == ["reference", "FAIL"], rows
  table = doctor.format_table(rows)
  assert "FAIL" in table


def test_refusal_is_reported_not_failed():
  check = next(c for c in doctor.checks_for("cpu") if c.name == "gated DeltaNet packed")
  row = doctor.run_checks(
    [dataclasses.replace(check, implementations=("reference", "reference_chunked"))], timed=False
  )[1]
  assert row["status"] == "refused" and "segment_ids" in row["error"]


@pytest.mark.slow
def test_cpu_form_passes(tmp_path):
  out = tmp_path / "doctor.md"
  proc = subprocess.run(
    [sys.executable, "-m", "pipelines.cli", "doctor", "--out", str(out)],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  table = out.read_text()
  for name in ("attention causal", "attention packed", "attention block-sparse", "decode",
               "gated DeltaNet packed", "neural memory"):  # fmt: skip
    assert name in table
  assert "FAIL" not in table
