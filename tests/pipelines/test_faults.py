"""Faults in a run directory: corrupted checkpoints, non-finite updates, concurrent writers, bad
metrics lines. Each test breaks something the way a real fault would and checks what survives."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from pipelines import config as config_lib
from pipelines.cli import main as cli_main
from pipelines.errors import NonFiniteLossError
from pipelines.interchange import export, safetensors_io
from pipelines.run import build_model, load_run
from pipelines.train.checkpoint import Checkpointer, abstract
from pipelines.train.loop import train
from pipelines.train.metrics import MetricsWriter, read
from pipelines.train.optim import optimizer

ROOT = Path(__file__).resolve().parents[2]

RAW = {
  "model": {
    "preset": "tiny",
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 1,
    "d_ff": 64,
    "max_len": 64,
  },
  "data": {"source": "stdlib", "max_documents": 20, "seq_len": 16, "batch_size": 2},
  "mesh": {"data": 1},
  "train": {
    "steps": 6,
    "lr": 1e-2,
    "warmup_steps": 0,
    "log_every": 1,
    "eval_every": 0,
    "checkpoint_every": 2,
    "async_checkpoint": False,
    "progress": False,
  },
}


def experiment(tmp_path, name="run", **sections):
  raw = {k: dict(v) for k, v in RAW.items()}
  for k, v in sections.items():
    raw[k] = {**raw.get(k, {}), **v}
  raw["run_dir"] = str(tmp_path / name)
  return config_lib.from_dict(raw)


def target_of(exp):
  _, params, _ = build_model(exp)
  return abstract({"params": params, "opt": optimizer(exp.train).init(params)})


def data_files(step_dir: Path) -> list[Path]:
  """The array data files of a checkpoint step (OCDBT chunks), largest first."""
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in f.as_posix()]
  return sorted(files, key=lambda f: -f.stat().st_size)


def truncate(step_dir):
  f = data_files(step_dir)[0]
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def overwrite(step_dir):
  f = data_files(step_dir)[0]
  f.write_bytes(b"\0" * f.stat().st_size)


def bit_flip(step_dir):
  f = data_files(step_dir)[0]
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x01
  f.write_bytes(bytes(data))


def nan_bytes(step_dir):
  # 16 bytes of float32 NaN patterns in three data files, as in the measured fault.
  for f in data_files(step_dir)[:3]:
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = np.full(4, np.nan, np.float32).tobytes()
    f.write_bytes(bytes(data))


def uncommitted(step_dir):
  # Killed after Orbax finalised the step but before its checksum manifest was written.
  (step_dir / "sha256.json").unlink()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
  tmp = tmp_path_factory.mktemp("faults")
  exp = experiment(tmp)
  train(exp)
  return exp


@pytest.mark.parametrize("corrupt", [truncate, overwrite, bit_flip, nan_bytes, uncommitted])
def test_corrupted_step_is_refused_for_the_previous_one(tmp_path, trained_run, corrupt):
  run = tmp_path / "copy"
  shutil.copytree(trained_run.run_dir, run)
  corrupt(run / "checkpoints" / "6")
  ckpt = Checkpointer(run, async_save=False)
  try:
    step, state, _, _ = ckpt.restore(target_of(trained_run))
  finally:
    ckpt.close()
  assert step == 4
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_corrupted_latest_step_run_finishes_from_previous_and_saves_again(tmp_path, caplog):
  class Killed(Exception):
    pass

  def die(step, _):
    if step == 5:  # after the step-4 checkpoint
      raise Killed

  exp = experiment(tmp_path)
  with pytest.raises(Killed):
    train(exp, on_step=die)
  ckpt_dir = Path(exp.run_dir) / "checkpoints"
  truncate(ckpt_dir / "4")
  with caplog.at_level(logging.WARNING):
    result = train(exp)
  assert result.step == 6
  warned = [r.getMessage() for r in caplog.records if "checkpoint step 4" in r.getMessage()]
  assert len(warned) == 1 and "moved aside" in warned[0]
  aside = [p.name for p in ckpt_dir.iterdir() if p.name.startswith("step_4.corrupt-")]
  assert len(aside) == 1  # kept for inspection
  ckpt = Checkpointer(exp.run_dir, async_save=False)
  try:
    assert ckpt.all_steps() == [2, 4, 6]  # step 4 saved again
    assert ckpt.check(4) is None and ckpt.check(6) is None
  finally:
    ckpt.close()
  assert [r["step"] for r in read(Path(exp.run_dir) / "metrics.jsonl")] == list(range(1, 7))


@pytest.mark.parametrize("corrupt", [bit_flip, nan_bytes])
def test_export_refuses_a_corrupt_only_checkpoint(tmp_path, trained_run, corrupt, capsys):
  run = tmp_path / "copy"
  shutil.copytree(trained_run.run_dir, run)
  for s in (2, 4, 6):
    corrupt(run / "checkpoints" / str(s))
  out = tmp_path / "export"
  rc = cli_main(["export", str(run), "--format", "safetensors", "--out", str(out)])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "SHA-256" in err and len(err.splitlines()) == 1
  assert not (out / "model.safetensors").exists()


def test_export_refuses_nonfinite_parameters(tmp_path, trained_run):
  _, model, _ = load_run(trained_run.run_dir)
  from flax import nnx

  leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
  param = next(v for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  param[...] = param[...].at[(0,) * leaf.ndim].set(np.nan)
  with pytest.raises(export.CorruptFileError, match="non-finite"):
    export.save_safetensors(model, trained_run, tmp_path / "st", step=6)
  assert not (tmp_path / "st" / "model.safetensors").exists()


def test_exported_file_with_nan_bytes_is_refused(tmp_path, trained_run):
  out = export.export(trained_run.run_dir, "safetensors", tmp_path / "st")
  path = out / "model.safetensors"
  data = bytearray(path.read_bytes())
  data[-16:] = np.full(4, np.nan, np.float32).tobytes()
  path.write_bytes(bytes(data))
  with pytest.raises(export.CorruptFileError, match="SHA-256"):
    export.load_safetensors(out)
  # Even with every checksum rewritten to vouch for it, NaN weights are refused.
  meta = json.loads((out / "config.json").read_text())
  meta["sha256"] = safetensors_io.sha256(path)
  (out / "config.json").write_text(json.dumps(meta))
  safetensors_io.write_checksums(out)
  with pytest.raises(export.CorruptFileError, match="non-finite"):
    export.load_safetensors(out)


def test_interrupted_export_is_refused(tmp_path, trained_run):
  out = export.export(trained_run.run_dir, "safetensors", tmp_path / "st")
  export.load_safetensors(out)
  # A kill during export leaves no checksums.json: it is written last, after every file.
  (out / "checksums.json").unlink()
  with pytest.raises(export.CorruptFileError, match="interrupted"):
    export.load_safetensors(out)


def test_hf_export_with_a_flipped_bit_is_refused_on_import(tmp_path, trained_run):
  from pipelines.interchange import hf

  out = export.export(trained_run.run_dir, "hf", tmp_path / "hf")
  bit_flip_file = out / "model.safetensors"
  data = bytearray(bit_flip_file.read_bytes())
  data[-3] ^= 0x10
  bit_flip_file.write_bytes(bytes(data))
  with pytest.raises(export.CorruptFileError, match="SHA-256"):
    hf.import_hf(out, tmp_path / "imported")
  assert not (tmp_path / "imported" / "checkpoints").exists()


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_huge_lr_never_puts_nonfinite_parameters_on_disk(tmp_path, mode):
  # lr=1e39 is inf in float32: loss and gradient at the old parameters are finite, the update
  # is not.
  exp = experiment(
    tmp_path, train={"lr": 1e39, "steps": 3, "checkpoint_every": 1, "on_nonfinite": mode}
  )
  if mode == "stop":
    with pytest.raises(NonFiniteLossError, match="step 1"):
      train(exp)
  else:
    result = train(exp)
    assert result.history[-1]["skipped_steps"] == 3
  steps = sorted(int(p.name) for p in (Path(exp.run_dir) / "checkpoints").glob("[0-9]*"))
  assert steps == ([] if mode == "stop" else [1, 2, 3])
  reader = ocp.StandardCheckpointer()
  for s in steps:
    # Read the raw files, not through Checkpointer (whose finite check would hide them).
    saved = reader.restore(Path(exp.run_dir) / "checkpoints" / str(s) / "state")
    for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(result.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # every step was skipped
  if mode == "skip":
    # ... so the parameters are the initial ones (built sharded under jit here, eagerly there:
    # the two initialisations may differ by float32 rounding, hence the tolerance).
    _, init, _ = build_model(exp)
    for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(init)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_second_train_on_the_same_run_dir_is_refused(tmp_path):
  exp = experiment(tmp_path, train={"steps": 4})
  config = tmp_path / "exp.yaml"
  config.write_text(yaml.safe_dump(exp.to_dict()))
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  second = {}

  def start_second(step, _):
    if step == 2:
      second["proc"] = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
      )
      second["metrics"] = (Path(exp.run_dir) / "metrics.jsonl").read_bytes()

  train(exp, on_step=start_second)
  proc = second["proc"]
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(err) == 1 and f"pid {os.getpid()}" in err[0] and socket.gethostname() in err[0]
  # The second run wrote nothing: the metrics are the first run's, each step once, in order.
  assert second["metrics"] == b"".join(
    json.dumps(r).encode() + b"\n" for r in read(Path(exp.run_dir) / "metrics.jsonl")[:2]
  )
  assert [r["step"] for r in read(Path(exp.run_dir) / "metrics.jsonl")] == [1, 2, 3, 4]
  assert not (Path(exp.run_dir) / "LOCK").exists()  # released at the end


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
  from pipelines.rundir import RunLock, RunLockedError

  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = {"pid": dead.pid, "host": socket.gethostname(), "since": 0}
  (tmp_path / "LOCK").write_text(json.dumps(stale))
  lock = RunLock(tmp_path).acquire()
  try:
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    # While it is held, a second taker (another open file, as another process has) is refused.
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host"):
      RunLock(tmp_path).acquire()
  finally:
    lock.release()
  RunLock(tmp_path).acquire().release()  # free again once released


def test_bad_middle_line_of_metrics_keeps_every_other_record(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)]
  lines[2] = lines[2][:9] + "\x00garbage"
  original = ("\n".join(lines) + "\n").encode()
  path.write_bytes(original)
  with caplog.at_level(logging.WARNING):
    assert [r["step"] for r in read(path)] == [1, 2, 4, 5, 6]
  assert any(":3: skipped a bad line" in r.getMessage() for r in caplog.records)
  # A writer resuming at step 6 appends; it never rewrites (so never loses) what is there.
  w = MetricsWriter(tmp_path, resume_step=6, tensorboard=False)
  w.write(7, loss=0.1)
  w.close()
  assert path.read_bytes().startswith(original)
  assert [r["step"] for r in read(path)] == [1, 2, 4, 5, 6, 7]


def test_resume_marker_drops_records_of_the_crashed_tail(tmp_path):
  path = tmp_path / "metrics.jsonl"
  # A torn last line, as after a kill during a write.
  path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
  w = MetricsWriter(tmp_path, resume_step=4, tensorboard=False)
  w.write(5, loss=0.5)
  w.close()
  assert [r["step"] for r in read(path)] == [1, 2, 3, 4, 5]
  assert read(path)[-1] == {"step": 5, "loss": 0.5}


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [3, 6])
def test_kill_9_during_training_resumes_to_the_uninterrupted_result(tmp_path, kill_after):
  """A real SIGKILL of ``memzoo train`` (async saves every step, so the kill can land inside a
  save or between a save and its manifest); the resumed run equals an uninterrupted one."""
  import signal
  import time

  over = {"steps": 10, "checkpoint_every": 1, "async_checkpoint": True}
  straight = train(experiment(tmp_path, "straight", train=over))
  exp = experiment(tmp_path, "killed", train=over)
  config = tmp_path / "exp.yaml"
  config.write_text(yaml.safe_dump(exp.to_dict()))
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
    [sys.executable, "-m", "pipelines.cli", "train", str(config)], cwd=ROOT, env=env
  )
  metrics = Path(exp.run_dir) / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(read(metrics)) >= kill_after:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = train(exp)
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  steps = [r["step"] for r in read(metrics)]
  assert steps == list(range(1, 11))
  want = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in straight.history]
  got = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read(metrics)]
  assert got == want
