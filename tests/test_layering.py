"""The package's import structure (read from the source, not by importing it): ``ops`` imports
neither ``zoo`` nor ``pipelines``, ``zoo`` never imports ``pipelines``, shared layers never
import a model family, ``zoo`` uses only what an op package exports, and no modules import each
other in a cycle (imports inside functions count: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ops", "zoo", "pipelines")
# zoo/ entries that are not model families.
ZOO_SHARED = {"layers", "interface", "registry", "configbase"}


def module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def modules() -> dict[str, Path]:
  return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def exported_names(path: Path) -> set[str]:
  """Names a package's ``__init__.py`` binds at its top level (imports and definitions)."""
  names: set[str] = set()
  for node in ast.parse(path.read_text(), str(path)).body:
    if isinstance(node, ast.ImportFrom | ast.Import):
      names.update((a.asname or a.name).split(".")[0] for a in node.names)
    elif isinstance(node, ast.FunctionDef | ast.ClassDef):
      names.add(node.name)
  return names


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
  """First-party modules ``path`` imports (``from a import b`` counts ``a.b`` when it is a
  module that ``a/__init__.py`` does not re-export under that name, else ``a``)."""
  is_pkg = path.name == "__init__.py"
  out: set[str] = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = name.split(".") if is_pkg else name.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
      init = ROOT / base.replace(".", "/") / "__init__.py"
      exported = exported_names(init) if init.is_file() else set()
      targets = [
        f"{base}.{a.name}" if f"{base}.{a.name}" in known and a.name not in exported else base
        for a in node.names
      ]
    else:
      continue
    out.update(t for t in targets if t.split(".")[0] in PACKAGES)
  out.discard(name)
  return out


def graph() -> dict[str, set[str]]:
  mods = modules()
  known = set(mods)
  return {name: imports_of(path, name, known) for name, path in mods.items()}


def layer_violations(g: dict[str, set[str]]) -> list[str]:
  bad = []
  for src, targets in g.items():
    top = src.split(".")[0]
    for dst in sorted(targets):
      dtop = dst.split(".")[0]
      if top == "ops" and dtop in ("zoo", "pipelines"):
        bad.append(f"{src} -> {dst} (ops imports only jax)")
      if top == "zoo" and dtop == "pipelines":
        bad.append(f"{src} -> {dst} (zoo never imports pipelines)")
      parts = dst.split(".")
      if (
        src.startswith("zoo.layers")
        and top == dtop == "zoo"
        and parts[1:2]
        and (parts[1] not in ZOO_SHARED)
      ):
        bad.append(f"{src} -> {dst} (a shared layer imports a family)")
      # zoo uses an op through its package's exports only: ops.<op> or ops.memory.
      if (
        top == "zoo"
        and dtop == "ops"
        and len(parts) > 2
        and not (parts[1] == "memory" and len(parts) == 3)
      ):
        bad.append(f"{src} -> {dst} (zoo reaches into an op's internals)")
  return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on: set[str] = set()
  out: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in g.get(v, ()):
      if w not in g:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(g):
    if v not in index:
      visit(v)
  return out


def test_layers_point_down():
  assert layer_violations(graph()) == []


def test_no_import_cycles():
  assert cycles(graph()) == []


def test_checker_catches_what_it_forbids():
  # The checks above can fail: a planted upward import and a planted cycle are reported.
  g = {"ops.a": {"zoo.b"}, "zoo.b": {"pipelines.c"}, "pipelines.c": {"zoo.b"}}
  g["zoo.layers.x"] = {"zoo.titans.model"}
  bad = layer_violations(g)
  assert any(b.startswith("ops.a -> zoo.b") for b in bad)
  assert any(b.startswith("zoo.b -> pipelines.c") for b in bad)
  assert any(b.startswith("zoo.layers.x -> zoo.titans.model") for b in bad)
  assert cycles(g) == [["pipelines.c", "zoo.b"]]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_module_parses(pkg):
  # A syntax error would silently drop a module's edges from the graph.
  assert [m for m in modules() if m.startswith(pkg)]
