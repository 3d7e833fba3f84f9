"""``memzoo reproduce``: one small, seeded experiment per seed-paper claim.

A claim is a module in :mod:`pipelines.reproduce.claims` that defines ``CLAIM`` (a
:class:`Claim`). Running it returns an :class:`Outcome`; :func:`reproduce` writes
``OUT/<name>/result.json`` and ``OUT/<name>/<name>.png`` and prints one verdict line, and
:func:`write_table` builds ``REPRODUCTIONS.md`` from every ``result.json`` under ``OUT``.

Sizes: ``tiny`` (seconds, for tests of the plumbing; the verdict means nothing there),
``small`` (the default: minutes on 2 CPU cores, the size ``REPRODUCTIONS.md`` reports) and
``large`` (longer training and more examples, for an accelerator).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipelines.errors import InputError  # noqa: E402
from pipelines.rundir import atomic_write_text  # noqa: E402

Size = Literal["tiny", "small", "large"]
SIZES: tuple[str, ...] = ("tiny", "small", "large")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every claim's ``run`` receives."""

  size: Size = "small"
  seed: int = 0
  out_dir: Path = Path("reproductions")
  progress: bool = True

  def pick(self, tiny: Any, small: Any, large: Any) -> Any:
    """The value for this size: ``settings.pick(tiny=20, small=300, large=2000)``."""
    return {"tiny": tiny, "small": small, "large": large}[self.size]


@dataclasses.dataclass
class Outcome:
  """What a claim measured.

  Attributes:
    measured: one line with the numbers the verdict rests on.
    holds: whether the paper's claim holds at this scale.
    data: JSON-serialisable numbers (curves, accuracies, settings) saved in ``result.json``.
    plot: draws the picture on a fresh figure (``plot(fig)``); saved as ``<name>.png``.
    note: optional sentence (what was tried, why a claim does not hold at this scale).
  """

  measured: str
  holds: bool
  data: dict[str, Any]
  plot: Callable[[Any], None]
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Claim:
  """One paper's claim and the experiment that tests it.

  Attributes:
    name: the CLI name (``streaming_llm``).
    paper: the paper, short (``StreamingLLM (Xiao et al., 2023)``).
    statement: the claim, one sentence, as tested here.
    run: ``run(settings) -> Outcome``.
    minutes: the expected wall time at size ``small`` on 2 CPU cores.
  """

  name: str
  paper: str
  statement: str
  run: Callable[[Settings], Outcome]
  minutes: float


def claims() -> dict[str, Claim]:
  """Every claim, by name, in a stable order (module name)."""
  pkg = importlib.import_module("pipelines.reproduce.claims")
  found: dict[str, Claim] = {}
  for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
    if info.name.startswith("_"):
      continue
    claim = importlib.import_module(f"{pkg.__name__}.{info.name}").CLAIM
    found[claim.name] = claim
  return found


def get(name: str) -> Claim:
  known = claims()
  if name not in known:
    raise InputError(f"unknown claim {name!r}; known: {', '.join(known)} (memzoo reproduce --list)")
  return known[name]


def verdict_line(claim: Claim, outcome: Outcome) -> str:
  word = "holds" if outcome.holds else "does not hold"
  return f"{claim.name}: {claim.statement} | measured: {outcome.measured} | {word}"


def reproduce(name: str, settings: Settings) -> dict[str, Any]:
  """Runs one claim; writes its JSON and PNG under ``settings.out_dir/name``; returns the record."""
  if settings.size not in SIZES:
    raise InputError(f"unknown size {settings.size!r}; choose one of {', '.join(SIZES)}")
  claim = get(name)
  start = time.perf_counter()
  outcome = claim.run(settings)
  seconds = time.perf_counter() - start
  out = Path(settings.out_dir) / claim.name
  out.mkdir(parents=True, exist_ok=True)
  fig = plt.figure(figsize=(6.4, 4.0), dpi=110)
  outcome.plot(fig)
  fig.suptitle(f"{claim.paper}: {claim.name}", fontsize=9)
  fig.tight_layout()
  png = out / f"{claim.name}.png"
  fig.savefig(png)
  plt.close(fig)
  record = {
    "claim": claim.name,
    "paper": claim.paper,
    "statement": claim.statement,
    "measured": outcome.measured,
    "holds": bool(outcome.holds),
    "note": outcome.note,
    "size": settings.size,
    "seed": settings.seed,
    "seconds": round(seconds, 1),
    "figure": png.name,
    "data": outcome.data,
    "verdict": verdict_line(claim, outcome),
  }
  atomic_write_text(out / "result.json", json.dumps(record, indent=1, default=float))
  return record


def load_results(out_dir: Path) -> list[dict[str, Any]]:
  order = list(claims())
  found = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*/result.json"))]
  return sorted(found, key=lambda r: order.index(r["claim"]) if r["claim"] in order else 99)


def write_table(out_dir: Path, path: Path | None = None) -> Path:
  """``REPRODUCTIONS.md`` (by default in ``out_dir``) from every ``result.json`` under it."""
  records = load_results(out_dir)
  if not records:
    raise InputError(f"no result.json under {out_dir}; run memzoo reproduce --all first")
  path = Path(path) if path else Path(out_dir) / "REPRODUCTIONS.md"
  path.parent.mkdir(parents=True, exist_ok=True)
  rel = Path(os.path.relpath(Path(out_dir).resolve(), path.parent.resolve()))
  lines = [
    "# Reproductions",
    "",
    "One small, seeded experiment per paper claim (`memzoo reproduce CLAIM`); a claim that does",
    "not hold at this scale is reported as such. Regenerate with "
    f"`memzoo reproduce --all --out {rel}`.",
    "",
    "| claim | paper | statement | measured | verdict | size, seed | wall |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in records:
    word = "**holds**" if r["holds"] else "**does not hold**"
    lines.append(
      f"| `{r['claim']}` | {r['paper']} | {r['statement']} | {r['measured']} | {word} | "
      f"{r['size']}, {r['seed']} | {r['seconds']:.0f} s |"
    )
  lines.append("")
  for r in records:
    lines += [f"## {r['claim']}", "", f"![{r['claim']}]({rel / r['claim'] / r['figure']})", ""]
    if r.get("note"):
      lines += [r["note"], ""]
  atomic_write_text(path, "\n".join(lines))
  return path
