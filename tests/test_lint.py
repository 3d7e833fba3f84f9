"""The code base stays `ruff check` and `ruff format` clean (config in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["ops", "zoo", "pipelines", "tests"]


def ruff():
  exe = Path(sys.executable).parent / "ruff"
  return str(exe) if exe.exists() else shutil.which("ruff")


@pytest.mark.skipif(ruff() is None, reason="ruff is not installed")
@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args):
  proc = subprocess.run([ruff(), *args, *PATHS], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr
