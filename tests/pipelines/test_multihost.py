"""Two processes on 127.0.0.1 (gloo) train, checkpoint and resume; the result equals a
single-process run of the same experiment."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from pipelines import config as config_lib
from pipelines.run import load_run
from pipelines.train.loop import train
from pipelines.train.metrics import read

ROOT = Path(__file__).resolve().parents[2]
LR = 1e-2
# Losses are means over the same tokens summed in another order. AdamW divides each update by
# the gradient's own RMS, so summation-order noise in a near-zero gradient can move that one
# parameter by a small fraction of lr per step: parameters get a tolerance in units of lr.
TOL = {"loss": 1e-5, "params": 0.05 * LR}
STEPS, FIRST = 4, 2
# Generous: two processes compile the step on a shared 2-core machine; gloo waits are bounded
# by the --timeout given to jax.distributed.
TIMEOUT_S = 900

RAW = {
  "model": {
    "preset": "tiny",
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 1,
    "d_ff": 64,
  },
  "data": {"source": "stdlib", "max_documents": 20, "seq_len": 16, "batch_size": 4},
  # A constant learning rate, so stopping at FIRST and resuming to STEPS is the same schedule.
  "train": {
    "steps": STEPS,
    "lr": LR,
    "warmup_steps": 0,
    "min_lr_ratio": 1.0,
    "log_every": 1,
    "eval_every": 0,
    "checkpoint_every": FIRST,
    "async_checkpoint": False,
    "progress": False,
  },
}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(config: Path, overrides: list[str], n: int = 2, local_devices: int = 2):
  """Runs ``memzoo train`` as ``n`` processes of one job; fails on error or timeout."""
  port = free_port()
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(ROOT),
    # The resumed job reuses the first job's compiled step.
    "JAX_COMPILATION_CACHE_DIR": str(config.parent / "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "pipelines.distributed",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(n),
        "--process-id",
        str(i),
        "--local-devices",
        str(local_devices),
        "--timeout",
        "120",
        "--",
        "train",
        str(config),
        *overrides,
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(n)
  ]
  outputs = ["" for _ in procs]
  try:
    for i, p in enumerate(procs):
      outputs[i] = p.communicate(timeout=TIMEOUT_S)[0]
  finally:
    for i, p in enumerate(procs):
      if p.poll() is None:
        p.kill()
        outputs[i] = p.communicate()[0]
  if any(p.returncode for p in procs):
    logs = "\n".join(
      f"--- process {i} (rc {p.returncode}):\n{out[-3000:]}"
      for i, (p, out) in enumerate(zip(procs, outputs))
    )
    pytest.fail(f"a process failed:\n{logs}")
  return outputs


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_equal_one_process(tmp_path):
  run = tmp_path / "multi"
  config = tmp_path / "exp.yaml"
  config.write_text(yaml.safe_dump({**RAW, "run_dir": str(run), "mesh": {"data": -1}}))

  launch(config, [f"train.steps={FIRST}"])
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [FIRST]
  outputs = launch(config, [])  # resumes from step FIRST to STEPS
  assert all(f"finished step {STEPS}" in out for out in outputs)

  single = train(
    config_lib.from_dict({**RAW, "run_dir": str(tmp_path / "one"), "mesh": {"data": 1}})
  )
  multi_losses = [r["loss"] for r in read(run / "metrics.jsonl")]
  one_losses = [r["loss"] for r in single.history]
  assert len(multi_losses) == STEPS
  np.testing.assert_allclose(multi_losses, one_losses, rtol=TOL["loss"])

  _, model, step = load_run(run)  # restored onto this process's one-device layout
  assert step == STEPS
  from flax import nnx

  got = jax.tree.leaves(nnx.state(model, nnx.Param))
  for a, b in zip(got, jax.tree.leaves(single.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL["params"], rtol=0)
