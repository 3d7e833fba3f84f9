"""Configs: validation errors name the key, the file and the closest valid key."""

import subprocess
import sys

import pytest

from pipelines import config as config_lib
from pipelines.config import ConfigError


def write(tmp_path, text):
  p = tmp_path / "exp.yaml"
  p.write_text(text)
  return p


@pytest.mark.parametrize(
  "text, expected",
  [
    ("train:\n  stpes: 3\n", ["train.stpes", "train.steps"]),
    ("model:\n  d_modle: 64\n", ["model.d_modle", "model.d_model"]),
    ("trian:\n  steps: 3\n", ["trian", "train"]),
    ("train:\n  steps: many\n", ["train.steps"]),
    ("model:\n  n_heads: 3\n", ["n_heads=3", "d_model=128"]),
    ("model:\n  name: transfomer\n", ["transfomer", "transformer"]),
    ("model:\n  preset: tinny\n", ["model.preset", "tiny"]),
    ("data:\n  batch_size: 6\ntrain:\n  grad_accum: 4\n", ["grad_accum=4", "batch_size=6"]),
    ("model:\n  vocab_size: 100\n", ["vocab_size=100"]),
    ("model:\n  rope_scaling: {kind: yarn, factor: 4}\n", ["original_max_len"]),
  ],
)
def test_bad_config_names_key_and_file(tmp_path, text, expected):
  path = write(tmp_path, text)
  with pytest.raises(ConfigError) as e:
    config_lib.load(path)
  msg = str(e.value)
  assert str(path) in msg
  for piece in expected:
    assert piece in msg


def test_overrides_and_defaults(tmp_path):
  path = write(tmp_path, "model:\n  preset: tiny\n  d_model: 64\ntrain:\n  steps: 5\n")
  exp = config_lib.load(path, ["train.steps=7", "model.n_layers=1", "run_dir=/tmp/x"])
  assert exp.train.steps == 7 and exp.model.n_layers == 1 and exp.model.d_model == 64
  assert exp.run_dir == "/tmp/x"
  with pytest.raises(ConfigError, match="key=value"):
    config_lib.load(path, ["train.steps"])


def test_roundtrip_dump(tmp_path):
  exp = config_lib.load(write(tmp_path, "model:\n  rope_scaling: {kind: linear, factor: 2}\n"))
  out = tmp_path / "resolved.yaml"
  config_lib.dump(exp, out)
  again = config_lib.load(out)
  assert again.to_dict() == exp.to_dict()


def test_yaml_never_executes_code(tmp_path):
  path = write(tmp_path, "run_dir: !!python/object/apply:os.system ['echo pwned']\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    config_lib.load(path)


def test_every_shipped_config_validates():
  from pathlib import Path

  configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
  assert configs
  for path in configs:
    config_lib.load(path)


def test_cli_misspelt_key_fails_fast(tmp_path):
  path = write(tmp_path, "train:\n  stpes: 3\n")
  proc = subprocess.run(
    [sys.executable, "-m", "pipelines.cli", "train", str(path)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert "train.stpes" in proc.stderr and "train.steps" in proc.stderr
