"""Extrapolation and evaluation suites on a tiny trained run."""

import json

import numpy as np
import pytest

import zoo
from pipelines import config as config_lib
from pipelines.evaluation import extrapolate
from pipelines.evaluation import suite as eval_suite
from pipelines.evaluation.chunked import ChunkedRunner
from pipelines.train.loop import train
from tests.zoo.helpers import forward_fn

L = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("extrap") / "run"
  exp = config_lib.from_dict(
    {
      "run_dir": str(path),
      "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 192},
      "data": {"source": "stdlib", "max_documents": 120, "seq_len": L, "batch_size": 16},
      "mesh": {"data": 1},
      "train": {
        "steps": 250,
        "lr": 5e-3,
        "warmup_steps": 20,
        "eval_every": 0,
        "checkpoint_every": 250,
        "async_checkpoint": False,
        "progress": False,
      },
      "eval": {"batches": 2, "sample_tokens": 0},
    }
  )
  train(exp)
  return path


def test_chunked_runner_equals_forward():
  model = zoo.build(zoo.config("transformer", "tiny", d_model=32, n_heads=2, n_kv_heads=1), rngs=0)
  x = np.random.default_rng(0).integers(0, 256, (2, 23)).astype(np.int32)
  logits, nll = ChunkedRunner(model, chunk=8).run(x, x)
  np.testing.assert_allclose(logits, forward_fn(model)(x), atol=2e-4)
  assert nll.shape == (2, 23)


def test_variant_configs():
  cfg = zoo.config("transformer", "tiny")
  ntk = extrapolate.variant_config(cfg, "ntk", 64, 512)
  assert ntk.rope_scaling.kind == "ntk" and ntk.rope_scaling.factor == 8 and ntk.max_len >= 512
  sw = extrapolate.variant_config(cfg, "sinks_window", 64, 512)
  assert sw.window + sw.sinks == 64 and sw.sinks == extrapolate.SINKS
  with pytest.raises(ValueError, match="unknown variant"):
    extrapolate.variant_config(cfg, "magic", 64, 512)


@pytest.mark.slow
def test_extrapolation_shows_the_known_picture(run_dir):
  res = extrapolate.run(
    run_dir,
    factors=(1, 8),
    variants=("none", "ntk", "sinks_window"),
    windows=4,
    passkey_factors=(4,),
    depths=(0.0, 1.0),
    passkey_examples=2,
  )
  per = {k: v["perplexity"] for k, v in res["variants"].items()}
  n = str(8 * L)
  inside = per["none"][str(L)]["mean_loss"]
  beyond = {k: p[n]["loss_beyond_train_len"] for k, p in per.items()}
  # Without scaling the loss past L rises above the in-distribution loss...
  assert beyond["none"] > inside + 0.2, (inside, beyond)
  # ...and the streaming policy keeps it far lower.
  assert beyond["sinks_window"] < beyond["none"] - 0.2, beyond
  saved = json.loads((run_dir / "extrapolation.json").read_text())
  assert saved["train_len"] == L and set(saved["variants"]) == {"none", "ntk", "sinks_window"}
  for png in ("extrapolation_loss.png", "passkey_none.png", "passkey_sinks_window.png"):
    assert (run_dir / png).stat().st_size > 10_000
  text = (run_dir / "report.md").read_text()
  assert "## Length extrapolation" in text and "extrapolation_loss.png" in text
  assert f"loss@{8 * L}" in text


@pytest.mark.slow
def test_eval_suite_table(run_dir):
  out = eval_suite.run(run_dir, "all", n=4, batches=1)
  assert out["heldout"]["heldout_bits_per_byte"] > 0
  rows = out["synthetic"]
  tasks = {r["task"] for r in rows}
  assert {"passkey", "mqar", "selective_copy"} <= tasks
  # Every scored row is the task scored directly with the run's model (the reference path:
  # the same task, seed and examples through a fresh streaming runner).
  from pipelines.evaluation.extrapolate import heldout_stream
  from pipelines.run import load_run
  from pipelines.tasks import evaluate as evaluate_task
  from pipelines.tasks import get as get_task

  exp, model, _ = load_run(run_dir)
  runner = ChunkedRunner(model, exp.data.seq_len)
  specs = dict(eval_suite.task_specs(exp.data.seq_len, heldout_stream(exp)))
  scored = [r for r in rows if r["accuracy"] is not None and r["length"] == L]
  assert {"passkey", "mqar"} <= {r["task"] for r in scored}
  for r in scored:
    source = get_task(r["task"], length=r["length"], seed=1234, **specs[r["task"]])
    want = evaluate_task(lambda x: runner.run(x)[0], source, 4, batch_size=8)
    assert r["n"] == want["n"] == 4 and r["accuracy"] == want["accuracy"], r
  assert "## Evaluation suite: all" in (run_dir / "report.md").read_text()
