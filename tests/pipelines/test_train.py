"""Training: loss falls, grad accumulation, kill-and-resume equality, non-finite handling."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from pipelines import config as config_lib
from pipelines.errors import NonFiniteLossError
from pipelines.run import load_run
from pipelines.train.checkpoint import Checkpointer
from pipelines.train.loop import train
from pipelines.train.metrics import read

BASE = {
  "model": {
    "preset": "tiny",
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 1,
    "d_ff": 64,
  },
  "data": {"source": "stdlib", "max_documents": 30, "seq_len": 32, "batch_size": 4},
  "mesh": {"data": 1},
  "train": {
    "steps": 12,
    "lr": 1e-2,
    "warmup_steps": 2,
    "log_every": 1,
    "eval_every": 6,
    "eval_batches": 1,
    "checkpoint_every": 4,
    "async_checkpoint": False,
    "progress": False,
  },
}


def experiment(tmp_path, name="run", **sections):
  raw = {k: dict(v) for k, v in BASE.items()}
  for k, v in sections.items():
    raw[k] = {**raw.get(k, {}), **v}
  raw["run_dir"] = str(tmp_path / name)
  return config_lib.from_dict(raw)


def params_of(result):
  return jax.tree.leaves(result.params)


def test_loss_falls(tmp_path):
  exp = experiment(tmp_path, train={"steps": 40, "eval_every": 20, "checkpoint_every": 40})
  result = train(exp)
  losses = [r["loss"] for r in result.history]
  assert np.mean(losses[-5:]) < losses[0] - 1.0
  evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
  assert len(evals) == 2 and evals[-1] < evals[0]
  assert (tmp_path / "run" / "tb").is_dir()
  assert len(read(tmp_path / "run" / "metrics.jsonl")) == 40


def test_interrupted_run_resumes_to_identical_parameters(tmp_path):
  straight = train(experiment(tmp_path, "straight"))

  class Killed(Exception):
    pass

  def die(step, _):
    if step == 10:  # after the step-8 checkpoint; steps 9-10 are lost and redone
      raise Killed

  exp = experiment(tmp_path, "resumed")
  with pytest.raises(Killed):
    train(exp, on_step=die)
  assert Checkpointer(exp.run_dir).latest_step() == 8
  resumed = train(exp)
  for a, b in zip(params_of(straight), params_of(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  steps = [r["step"] for r in read(tmp_path / "resumed" / "metrics.jsonl")]
  assert steps == list(range(1, 13))


def test_grad_accumulation_matches_full_batch(tmp_path):
  one = train(experiment(tmp_path, "one", train={"steps": 3}))
  acc = train(experiment(tmp_path, "acc", train={"steps": 3, "grad_accum": 2}))
  for a, b in zip(params_of(one), params_of(acc)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_nonfinite_loss_stops_without_checkpoint(tmp_path):
  exp = experiment(tmp_path, "nan", train={"lr": 1e30, "steps": 12})
  with pytest.raises(NonFiniteLossError, match="non-finite"):
    train(exp)
  steps = Checkpointer(exp.run_dir).all_steps()
  # Checkpoints written before the blow-up hold finite parameters only.
  for s in steps:
    _, model, _ = load_run(exp.run_dir) if s == max(steps) else (None, None, None)
    if model is not None:
      from flax import nnx

      for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_nonfinite_skip_keeps_state(tmp_path):
  exp = experiment(tmp_path, "skip", train={"lr": 1e30, "steps": 6, "on_nonfinite": "skip"})
  result = train(exp)
  assert result.history[-1]["skipped_steps"] >= 1
  for leaf in params_of(result):
    assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.slow
def test_cli_resume_30_then_60(tmp_path):
  run = tmp_path / "cli"
  cmd = [sys.executable, "-m", "pipelines.cli", "train", "configs/transformer_tiny.yaml"]
  common = [f"run_dir={run}", "train.progress=false", "data.max_documents=30", "data.seq_len=32"]
  p1 = subprocess.run(
    cmd + ["train.steps=30", *common], capture_output=True, text=True, timeout=600
  )
  assert p1.returncode == 0, p1.stderr
  assert Checkpointer(run).latest_step() == 30
  p2 = subprocess.run(
    cmd + ["train.steps=60", *common], capture_output=True, text=True, timeout=600
  )
  assert p2.returncode == 0, p2.stderr
  assert "finished step 60" in p2.stdout
  steps = [r["step"] for r in read(run / "metrics.jsonl")]
  assert steps[0] == 10 and steps[-1] == 60 and steps == sorted(set(steps))
