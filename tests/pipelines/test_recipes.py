"""Recipes: every YAML in configs/ is a named recipe with a one-line purpose, resolvable from any
directory; unknown names fail with one line."""

from pathlib import Path

import pytest

from pipelines import cli, recipes
from pipelines import config as config_lib

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_every_config_is_a_recipe_with_a_purpose():
  assert recipes.names() == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
  for name in recipes.names():
    line = recipes.purpose(name)
    assert line and len(line) <= 100 and line.endswith((".", ")")), (name, line)


def test_names_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  want = (CONFIGS / "transformer_tiny.yaml").resolve()
  for name in ("transformer_tiny", "transformer_tiny.yaml", "configs/transformer_tiny.yaml"):
    assert recipes.resolve(name).resolve() == want, name
  exp = config_lib.load("transformer_tiny", ["train.steps=3"])
  assert exp.train.steps == 3 and exp.run_dir == "runs/transformer_tiny"
  # A file that exists is taken as given, even with a recipe's name.
  local = tmp_path / "transformer_tiny.yaml"
  local.write_text("run_dir: runs/mine\n")
  assert recipes.resolve("transformer_tiny.yaml") == Path("transformer_tiny.yaml")
  assert config_lib.load("transformer_tiny.yaml").run_dir == "runs/mine"


@pytest.mark.parametrize("name", ["transformer_tinyy", "elsewhere/x.yaml"])
def test_unknown_recipe_is_one_line(name, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert cli.main(["check", name]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "transformer_tiny" in err[0], err


def test_cli_recipes_lists_them(capsys):
  assert cli.main(["recipes"]) == 0
  out = capsys.readouterr().out
  for name in recipes.names():
    assert f"{name} " in out and recipes.purpose(name) in out
