"""The docs are true to the code: every command in README.md and configs/README.md parses and
names a recipe that validates, and every command in the README's Quickstart and Command line
blocks runs, in order, at a tiny size, from a directory outside the clone."""

import re
import shlex
from pathlib import Path

import pytest

from pipelines import cli
from pipelines import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "configs" / "README.md"]

# What "tiny" adds to each command (argparse keeps the last value of a repeated flag).
TINY_CONFIG = [
  "data.seq_len=16",
  "data.batch_size=2",
  "data.max_documents=8",
  "mesh.data=1",
  "train.eval_every=0",
  "train.async_checkpoint=false",
  "train.progress=false",
  "eval.batches=1",
  "eval.sample_tokens=4",
]
TINY_ARGS = {
  "eval": ["--examples", "1", "--batches", "1"],
  "extrapolate": ["--windows", "1", "--passkey-examples", "1", "--passkey-factors", "2"]
  + ["--depths", "0.5"],
  "bench attention": ["--repeats", "1", "--fwd-only", "--impl", "xla"],
  "bench memory": ["--lengths", "64", "--repeats", "1", "--heads", "1", "--dim", "8"]
  + ["--hidden", "8"],
  "bench model": ["--lengths", "16"],
  "reproduce": ["--size", "tiny"],
}


def _blocks(doc, sections=None):
  """Shell lines of the fenced bash blocks of ``doc`` (only under the given ``##`` headings)."""
  text = doc.read_text()
  if sections is not None:
    parts = re.split(r"^## ", text, flags=re.M)
    text = "\n".join(p for p in parts if p.split("\n", 1)[0].strip() in sections)
  out = []
  for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
    for line in block.splitlines():
      line = line.split("#", 1)[0].strip()
      if line.startswith("memzoo "):
        out.append(line)
  return out


def commands():
  return [(doc.name, line) for doc in DOCS for line in _blocks(doc)]


def test_docs_have_commands():
  names = {c.split()[1] for _, c in commands()}
  assert {"train", "eval", "extrapolate", "bench", "recipes", "demo"} <= names


@pytest.mark.parametrize("doc, command", commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_command_parses_and_its_config_validates(doc, command):
  argv = shlex.split(command)[1:]
  args = cli.parser().parse_args(argv)
  if getattr(args, "config", None) and args.command in ("train", "check", "demo"):
    config_lib.load(args.config, args.overrides)  # a recipe name or a repository path


def tiny(argv):
  """``argv`` with the tiny-size arguments for its command appended."""
  argv = list(argv)
  if argv[0] in ("train", "check", "demo"):
    if argv[0] == "demo" and len(argv) == 1:
      argv.append("demo")
    steps = "train.steps=4" if argv[0] == "demo" else None
    argv += TINY_CONFIG + ([steps] if steps else [])
  key = argv[0] if argv[0] != "bench" else f"bench {argv[1]}"
  return argv + TINY_ARGS.get(key, [])


def test_tiny_arguments_are_valid_for_every_command():
  for line in _blocks(ROOT / "README.md", {"Quickstart", "Command line"}):
    argv = tiny(shlex.split(line)[1:])
    if argv[0] != "bench":
      cli.parser().parse_args(argv)


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  lines = _blocks(ROOT / "README.md", {"Quickstart", "Command line"})
  assert len(lines) >= 12
  for line in lines:
    rc = cli.main(tiny(shlex.split(line)[1:]))
    out = capsys.readouterr()
    assert rc == 0, f"{line}: exit {rc}\n{out.out[-2000:]}\n{out.err[-2000:]}"
  assert (tmp_path / "runs" / "demo" / "report.md").is_file()
  assert "Transformer vs a recurrent memory" in (tmp_path / "runs/demo/report.md").read_text()
  assert (tmp_path / "runs" / "imported").is_dir()


def test_make_targets_exist():
  makefile = (ROOT / "Makefile").read_text()
  for target in ("demo", "test", "lint"):
    assert re.search(rf"^{target}:", makefile, flags=re.M)
