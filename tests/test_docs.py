"""Every command in README.md and configs/README.md parses, and every config it names validates.

The commands themselves are exercised by the pipeline tests (train/resume in test_train.py,
eval and extrapolate in test_extrapolate.py, bench in the ops tests); this test keeps the docs
in step with the CLI and the shipped configs.
"""

import re
import shlex
from pathlib import Path

import pytest

from pipelines import cli
from pipelines import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "configs" / "README.md"]


def commands():
  out = []
  for doc in DOCS:
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", doc.read_text(), flags=re.S):
      for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("memzoo "):
          out.append((doc.name, line))
  return out


def test_docs_have_commands():
  names = {c.split()[1] for _, c in commands()}
  assert {"train", "eval", "extrapolate", "bench"} <= names


@pytest.mark.parametrize("doc, command", commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_command_parses_and_its_config_validates(doc, command):
  argv = shlex.split(command)[1:]
  args = cli.parser().parse_args(argv)
  if getattr(args, "config", None) and args.command in ("train", "check", "demo"):
    path = ROOT / args.config
    assert path.is_file(), f"{doc}: {command}: no config {args.config}"
    config_lib.load(path, args.overrides)


def test_make_targets_exist():
  makefile = (ROOT / "Makefile").read_text()
  for target in ("demo", "test", "lint"):
    assert re.search(rf"^{target}:", makefile, flags=re.M)
