"""BASED / Zoology (Arora et al., 2023-2024): MQAR recall against recurrent state size is a
curve that rises with the state, and BASED (Taylor linear attention + a sliding window) lies
above pure linear attention at equal state.

Reuses the MQAR table (``pipelines.evaluation.mqar_table``): BASED and "linear attention"
(BASED without its sliding-window layer) at two feature sizes each, every model trained with
the same budget for each seed. Linear attention's two sizes bracket both BASED states, so each
BASED point is compared with the linear-attention curve at the same state (interpolated in
log state), not with a model of less state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.evaluation.mqar_table import Variant, mqar_table
from pipelines.reproduce.core import Claim, Outcome, Settings
from pipelines.tasks.training import Budget

LINEAR, BASED = "linear attention", "based"
# The verdict: (a) for both models the mean accuracy (over seeds) at the larger state exceeds
# that at the smaller state; (b) each BASED point lies above the linear-attention curve at the
# same state (linear interpolation in log state between linear attention's two points).


def variants(feature_dims: tuple[int, ...], linear_dims: tuple[int, ...]) -> tuple[Variant, ...]:
  return tuple(Variant(BASED, "based", {"feature_dim": f}) for f in feature_dims) + tuple(
    Variant(LINEAR, "based", {"feature_dim": f, "attention_layers": ()}) for f in linear_dims
  )


def curves(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, list[float]]]]:
  """Per model: (state, mean accuracy over seeds, the seeds' accuracies), by state."""
  groups: dict[tuple[str, int], list[float]] = {}
  for r in rows:
    groups.setdefault((r["label"], int(r["state"])), []).append(float(r["accuracy"]))
  out: dict[str, list[tuple[int, float, list[float]]]] = {}
  for (label, state), accs in sorted(groups.items()):
    out.setdefault(label, []).append((state, float(np.mean(accs)), accs))
  return out


def interpolate(curve: list[tuple[int, float, list[float]]], state: int) -> float:
  xs = np.log([c[0] for c in curve])
  return float(np.interp(np.log(state), xs, [c[1] for c in curve]))


def run(settings: Settings) -> Outcome:
  budget = Budget(
    steps=settings.pick(tiny=2, small=300, large=1500),
    batch_size=settings.pick(tiny=4, small=32, large=64),
    lr=3e-3,
    eval_examples=settings.pick(tiny=4, small=256, large=1024),
  )
  task = settings.pick(
    tiny={"length": 32, "num_pairs": 4, "token_range": (0, 32)},
    small={"length": 64, "num_pairs": 8, "token_range": (0, 128)},
    large={"length": 128, "num_pairs": 16, "token_range": (0, 256)},
  )
  n_seeds = settings.pick(tiny=1, small=1, large=3)
  seeds = tuple(settings.seed + i for i in range(n_seeds))
  table = mqar_table(
    budget=budget,
    seeds=seeds,
    variants=variants(settings.pick(tiny=(2,), small=(4, 8), large=(4, 8, 16)),
                      settings.pick(tiny=(2,), small=(4, 8), large=(4, 8, 16))),
    **task,
  )  # fmt: skip
  cv = curves(table)
  rising = {m: cv[m][-1][1] > cv[m][0][1] for m in cv}
  above = {str(s): acc > interpolate(cv[LINEAR], s) for s, acc, _ in cv[BASED]}
  holds = all(rising.values()) and all(above.values())
  chance = float(table[0]["chance"])
  data = {
    "task": {**task, "token_range": list(task["token_range"])},
    "steps": budget.steps,
    "eval_examples": budget.eval_examples,
    "seeds": list(seeds),
    "chance": chance,
    "curves": {m: [{"state": s, "accuracy": a, "seeds": accs} for s, a, accs in c]
               for m, c in cv.items()},
    "linear_at_based_state": {str(s): interpolate(cv[LINEAR], s) for s, _, _ in cv[BASED]},
    "rising": rising,
    "based_above_linear": above,
  }  # fmt: skip

  def plot(fig):
    ax = fig.add_subplot()
    for m, c in cv.items():
      xs = [p[0] for p in c]
      line = ax.plot(xs, [p[1] for p in c], marker="o", label=f"{m} (mean of {n_seeds} seeds)")
      for x, _, accs in c:
        ax.scatter([x] * len(accs), accs, s=10, color=line[0].get_color(), alpha=0.5)
    ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set(xlabel="recurrent state (floats / sequence)", ylabel="MQAR accuracy", ylim=(0, 1.03))
    ax.legend(fontsize=8)

  pts = lambda m: ", ".join(f"{a:.2f} @ {s:,}" for s, a, _ in cv[m])  # noqa: E731
  measured = (
    f"MQAR accuracy @ state floats, mean of {n_seeds} seeds: BASED {pts(BASED)}; "
    f"linear attention {pts(LINEAR)} (at BASED's states: "
    + ", ".join(f"{v:.2f}" for v in data["linear_at_based_state"].values())
    + ")"
  )
  return Outcome(measured=measured, holds=bool(holds), data=data, plot=plot)


CLAIM = Claim(
  name="zoology",
  paper="BASED / Zoology (Arora et al., 2023-2024)",
  statement=(
    "MQAR recall rises with recurrent state for BASED and for linear attention, and BASED lies "
    "above linear attention at equal state (interpolated in log state)"
  ),
  run=run,
  minutes=8.0,
)
