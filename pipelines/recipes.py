"""Recipes: the YAML experiments that ship with memzoo, addressable by name from any directory.

The repository's ``configs/`` folder is the editable source; a built wheel carries the same files
as ``pipelines/configs/`` (``setup.py`` maps the folder into the package, no second copy in the
tree). ``memzoo train transformer_tiny`` and ``memzoo train configs/transformer_tiny.yaml`` name
the same recipe; a path to an existing file is always taken as that file. Each recipe opens with
a comment whose first line is its one-line purpose (``memzoo recipes`` lists them).
"""

from __future__ import annotations

from pathlib import Path

from pipelines.errors import MissingFileError

_HERE = Path(__file__).resolve().parent


def recipes_dir() -> Path:
  """The folder holding the recipes: the installed package data, else the repository's
  ``configs/`` (a checkout or an editable install)."""
  for d in (_HERE / "configs", _HERE.parent / "configs"):
    if d.is_dir() and any(d.glob("*.yaml")):
      return d
  raise MissingFileError(f"no recipes found next to {_HERE} (neither configs/ nor the package)")


def names() -> list[str]:
  """Recipe names (file stems), sorted."""
  return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def purpose(name: str) -> str:
  """The first line of a recipe's header comment (empty if it has none)."""
  for line in path(name).read_text().splitlines():
    if not line.startswith("#"):
      return ""
    text = line.lstrip("#").strip()
    if text:
      return text
  return ""


def path(name: str) -> Path:
  """The file of recipe ``name`` (``transformer_tiny``, ``transformer_tiny.yaml``)."""
  stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
  found = recipes_dir() / f"{stem}.yaml"
  if "/" in stem or "\\" in stem or not found.is_file():
    raise MissingFileError(
      f"no config file or recipe named {name!r}; recipes: {', '.join(names())}"
    )
  return found


def resolve(name_or_path: str | Path) -> Path:
  """An existing file as given; else the recipe it names, as a bare name or as the repository
  path ``configs/NAME.yaml`` (so commands written for a checkout work from any directory)."""
  p = Path(name_or_path)
  if p.is_file():
    return p
  if p.parent.name == "configs" or str(p.parent) == ".":
    try:
      return path(p.name)
    except FileNotFoundError:
      pass
  if p.suffix in (".yaml", ".yml") or p.parent != Path("."):
    raise MissingFileError(f"config file not found: {p} (recipes: {', '.join(names())})")
  return path(str(p))
