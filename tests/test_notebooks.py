"""Every Colab notebook runs top to bottom, headless, at its tiny size (MEMZOO_TINY=1), where a
user opens it: from a wheel installed in a fresh virtual environment outside the clone.

The venv gets the project only from the wheel; its dependencies come from the test's own
environment through a ``.pth`` line (site-packages added as a plain path, so that environment's
own ``.pth`` hooks, an editable install of the clone among them, do not run). Each notebook
executes with that venv's interpreter, in a temporary directory, with no PYTHONPATH.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))

DRIVER = """
import json, sys
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
# One more cell reports where the kernel imported the project from.
nb.cells.append(nbformat.v4.new_code_cell("import pipelines, sys; print(pipelines.__file__)"))
NotebookClient(nb, timeout=900, kernel_name="python3",
               resources={"metadata": {"path": sys.argv[2]}}).execute()
print("IMPORTED_FROM", nb.cells[-1].outputs[0]["text"].strip())
"""


def _code(path):
  return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_notebooks_exist_and_are_committed_without_outputs():
  assert len(NOTEBOOKS) >= 5
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


def test_notebooks_install_from_memzoo_source_and_use_recipe_names():
  for path in NOTEBOOKS:
    code = _code(path)
    first = code[0]
    assert first.splitlines()[3].startswith("MEMZOO_SOURCE = "), path.name
    assert '"[tpu]"' in first and '"[gpu]"' in first, path.name
    assert "memzoo{extra} @ {src}" in first, path.name
    for cell in code:
      assert "configs/" not in cell and "pip install memzoo" not in cell, path.name


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fresh")
  # Build from a copy, so the build leaves nothing in the clone.
  src = tmp / "src"
  shutil.copytree(
    ROOT,
    src,
    ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__"),
  )
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  subprocess.run(
    [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
    check=True,
  )
  (wheel,) = (tmp / "dist").glob("memzoo-*.whl")
  env_dir = tmp / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
  python = env_dir / "bin" / "python"
  site = subprocess.run(
    [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PATH=f"{env_dir / 'bin'}:{env['PATH']}", VIRTUAL_ENV=str(env_dir))
  work = tmp / "work"
  work.mkdir()
  check = [python, "-c", "import pipelines; print(pipelines.__file__)"]
  before = subprocess.run(check, cwd=work, env=env, capture_output=True, text=True)
  assert before.returncode != 0, f"the project is importable before install: {before.stdout}"
  subprocess.run(
    [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], check=True
  )
  where = subprocess.run(check, cwd=work, env=env, capture_output=True, text=True, check=True)
  assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout
  return {"python": python, "bin": env_dir / "bin", "env": env, "work": work, "root": env_dir}


@pytest.mark.notebook
def test_wheel_ships_the_recipes(venv):
  out = subprocess.run(
    [venv["bin"] / "memzoo", "recipes"],
    cwd=venv["work"],
    env=venv["env"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert "transformer_tiny" in out and "demo" in out, out
  assert str(venv["root"]) in out, out  # read from the installed package, not the clone
  check = subprocess.run(
    [venv["bin"] / "memzoo", "check", "transformer_tiny", "train.steps=2"],
    cwd=venv["work"],
    env=venv["env"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert "steps: 2" in check


# `make test` runs the notebooks that finish in about a minute from the wheel; the zoo tour (every
# family) and the MQAR training take about three minutes each and run in the slow set.
HEAVY = ("02_zoo_tour", "05_mqar")


def _notebook_case(path):
  marks = [pytest.mark.slow] if path.stem in HEAVY else [pytest.mark.slow, pytest.mark.notebook]
  return pytest.param(path, marks=marks, id=path.stem)


@pytest.mark.parametrize("path", [_notebook_case(p) for p in NOTEBOOKS])
def test_notebook_runs_from_the_wheel(path, venv, tmp_path):
  env = dict(venv["env"], MEMZOO_TINY="1", XLA_FLAGS="")  # one CPU device, as on Colab's CPU
  nb = tmp_path / path.name
  shutil.copy(path, nb)
  driver = tmp_path / "driver.py"
  driver.write_text(DRIVER)
  res = subprocess.run(
    [venv["python"], str(driver), str(nb), str(tmp_path)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
  )
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  where = [ln for ln in res.stdout.splitlines() if ln.startswith("IMPORTED_FROM")]
  assert where and Path(where[0].split()[1]).is_relative_to(venv["root"]), json.dumps(where)
