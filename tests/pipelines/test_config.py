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
    ("data:\n  seq_len: 1024\n", ["data.seq_len=1024", "max_len=512"]),
    ("train:\n  lr: .nan\n", ["lr", "finite"]),
    ("train:\n  lr: .inf\n", ["lr", "finite"]),
    ("train:\n  lr: -0.001\n", ["lr", "> 0"]),
    ("train:\n  b2: .nan\n", ["b2", "finite"]),
    ("eval:\n  temperature: .nan\n", ["temperature"]),
    ("", ["empty"]),
    ("# a comment only\n", ["empty"]),
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
  marker = tmp_path / "pwned"
  path = write(tmp_path, f"run_dir: !!python/object/apply:os.system ['touch {marker}']\n")
  with pytest.raises(ConfigError, match="not valid YAML") as e:
    config_lib.load(path)
  assert "!!python/object/apply:os.system" in str(e.value) and "refused" in str(e.value)
  assert len(str(e.value).splitlines()) == 1
  # The same tag in a command-line override: one clear line, not a traceback, never run.
  path = write(tmp_path, "run_dir: x\n")
  with pytest.raises(ConfigError, match="override.*refused") as e:
    config_lib.load(path, [f"run_dir=!!python/object/apply:os.system ['touch {marker}']"])
  assert len(str(e.value).splitlines()) == 1
  assert not marker.exists()


def test_misspelt_preset_suggests_the_preset(tmp_path):
  with pytest.raises(ConfigError) as e:
    config_lib.load(write(tmp_path, "model:\n  preset: tinyy\n"))
  assert "did you mean 'tiny'?" in str(e.value) and "model.ptiny" not in str(e.value)


def test_cli_refuses_bad_run_dirs_and_binary_corpora_in_one_line(tmp_path, capsys):
  from pipelines.cli import main as cli_main

  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  binary = tmp_path / "weights.bin"
  binary.write_bytes(bytes(range(256)) * 64)  # mostly invalid UTF-8, with NUL bytes
  text = tmp_path / "ok.txt"
  text.write_text("plain text " * 100)
  base = "model:\n  preset: tiny\nmesh:\n  data: 1\ndata:\n  seq_len: 16\n  batch_size: 2\n"
  cases = [
    (f"{base}run_dir: {blocker}/run\n", "cannot be used"),
    (
      f"{base}  source: text\n  paths: [{text}, {binary}]\nrun_dir: {tmp_path}/run\n",
      "is not UTF-8 text",
    ),
  ]
  for body, expected in cases:
    rc = cli_main(["train", str(write(tmp_path, body))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expected in err[0], err
  # Refused before any compute: no metrics, no checkpoints.
  assert not (tmp_path / "run" / "metrics.jsonl").exists()
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_text_corpus_with_a_few_bad_bytes_warns_once(tmp_path, caplog):
  from pipelines.data import corpus

  (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait\n" * 20)  # latin-1, not UTF-8
  (tmp_path / "b.txt").write_text("plain\n" * 20)
  with caplog.at_level("WARNING"):
    c = corpus.text_corpus([str(tmp_path)])
  assert len(c.documents) == 2 and "\ufffd" in c.documents[0].text
  warned = [r.getMessage() for r in caplog.records if "invalid UTF-8" in r.getMessage()]
  assert len(warned) == 1 and "a.txt: 20" in warned[0]


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
