"""JRT (Arora et al., 2024): a recurrent model's set-disjointness accuracy depends on the order
of the two sets (the small set first needs less state), and JRT-Prompt (the context read twice)
closes the gap.

One recurrent model (BASED's Taylor linear attention without its sliding-window layer: a fixed
state, no attention to fall back on) is trained with ``train_on_task`` on ``set_disjointness``
with the order drawn per example, half the examples read once and half with the context
repeated (JRT-Prompt's format, ``repeat=True``), so one set of weights serves both prompts.
The same parameters are then scored on four held-out sources: small set first or large set
first, read once or twice.
"""

from __future__ import annotations

from typing import Any

import zoo
from pipelines.evaluation.mqar_table import state_size
from pipelines.reproduce.claims._b_common import Interleave, train_and_score
from pipelines.reproduce.core import Claim, Outcome, Settings
from pipelines.tasks import get as get_task
from pipelines.tasks.training import Budget

ORDERS = ("small_first", "large_first")
PROMPTS = {"once": False, "JRT-Prompt": True}
# The verdict: the model has learned the task (read once, small first, accuracy >= LEARNED;
# chance is 0.5), small-first accuracy exceeds large-first by at least MIN_GAP, and with
# JRT-Prompt the gap (small-first minus large-first) is at most half of that. Without the
# first condition the gap is between two coin flips (a seeded run at chance had a gap of
# +0.06, 1.4 standard errors at 256 examples).
MIN_GAP = 0.05
LEARNED = 0.6


def run(settings: Settings) -> Outcome:
  length = settings.pick(tiny=24, small=32, large=64)
  small_size = settings.pick(tiny=2, small=2, large=4)
  large_size = settings.pick(tiny=6, small=10, large=20)
  feature_dim = settings.pick(tiny=2, small=2, large=4)
  budget = Budget(
    steps=settings.pick(tiny=3, small=600, large=3000),
    batch_size=settings.pick(tiny=4, small=32, large=64),
    lr=3e-3,
    eval_examples=settings.pick(tiny=4, small=256, large=1024),
  )
  cfg = zoo.config(
    "based",
    "tiny",
    feature_dim=feature_dim,
    attention_layers=(),
    chunk_size=min(64, 1 << (length - 1).bit_length()),
  )
  kw = {
    "length": length,
    "small_size": small_size,
    "large_size": large_size,
    "token_range": (0, 32),
  }
  s = settings.seed
  train = Interleave(
    [get_task("set_disjointness", order="random", repeat=r, seed=s + i, **kw)
     for i, r in enumerate(PROMPTS.values())]
  )  # fmt: skip
  held_out: dict[str, Any] = {}
  for i, order in enumerate(ORDERS):
    for j, (prompt, repeat) in enumerate(PROMPTS.items()):
      held_out[f"{order}/{prompt}"] = get_task(
        "set_disjointness", order=order, repeat=repeat, seed=s + 10_000 + 2 * i + j, **kw
      )
  out = train_and_score(cfg, train, held_out, budget, seed=s, progress=settings.progress)
  acc = out["accuracy"]
  gap = {p: acc[f"small_first/{p}"] - acc[f"large_first/{p}"] for p in PROMPTS}
  learned = acc["small_first/once"] >= LEARNED
  holds = learned and gap["once"] >= MIN_GAP and gap["JRT-Prompt"] <= gap["once"] / 2
  data = {
    "length": length,
    "small_size": small_size,
    "large_size": large_size,
    "state_floats": state_size(cfg),
    "steps": budget.steps,
    "eval_examples": budget.eval_examples,
    "first_loss": float(out["first_loss"]),
    "last_loss": float(out["last_loss"]),
    "accuracy": acc,
    "gap": gap,
    "learned": learned,
  }

  def plot(fig):
    ax = fig.add_subplot()
    width = 0.38
    for k, order in enumerate(ORDERS):
      xs = [i + (k - 0.5) * width for i in range(len(PROMPTS))]
      ys = [acc[f"{order}/{p}"] for p in PROMPTS]
      label = f"{order.replace('_', ' ')} ({small_size} vs {large_size} elements)"
      ax.bar(xs, ys, width, label=label)
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
    ax.set_xticks(range(len(PROMPTS)), ["context read once", "JRT-Prompt (read twice)"])
    ax.set(ylabel="set-disjointness accuracy", ylim=(0, 1.05))
    ax.set_title(f"linear attention, {data['state_floats']:,} state floats", fontsize=8)
    ax.legend(fontsize=8)

  measured = (
    f"read once: small-first {acc['small_first/once']:.2f} vs large-first "
    f"{acc['large_first/once']:.2f} (gap {gap['once']:+.2f}); JRT-Prompt: "
    f"{acc['small_first/JRT-Prompt']:.2f} vs {acc['large_first/JRT-Prompt']:.2f} "
    f"(gap {gap['JRT-Prompt']:+.2f})"
  )
  note = (
    "Design iteration: a first run (length 64, sets of 4 and 24 elements from 64 ids, "
    "feature_dim 4, 300 steps) stayed at chance (loss 0.69; all four accuracies 0.45-0.54); "
    "this run uses sets of 2 and 10 from 32 ids, feature_dim 2 and 600 steps."
  )
  if not learned:
    note += (
      f" Here too the model stays near chance (last loss {out['last_loss']:.3f}, ln 2 = 0.693):"
      " it has not learned the task in this budget, so the order effect cannot be tested; the"
      " measured gaps are noise."
    )
  return Outcome(measured=measured, holds=bool(holds), data=data, plot=plot, note=note)


CLAIM = Claim(
  name="jrt",
  paper="JRT (Arora et al., 2024)",
  statement=(
    "for a recurrent model that has learned set disjointness (small first >= "
    f"{LEARNED}), the task is easier with the small set first (by >= {MIN_GAP}), and "
    "JRT-Prompt (the context read twice) at least halves that gap"
  ),
  run=run,
  minutes=5.0,
)
