"""RoPE scaling: position interpolation (linear), NTK-aware and YaRN scaling give a lower loss
than unscaled RoPE at 2-8x the training length without retraining; Giraffe: after a short
finetune at the longer length, linear scaling is the best of them.

One transformer is trained on the embedded corpus at ``L`` tokens (the same run as the
StreamingLLM claim). Zero-shot: each variant (``extrapolate.variant_config``, factor = length /
``L``) scores held-out windows of ``2L``, ``4L`` and ``8L`` tokens. Finetuned: each variant,
configured for ``4L``, is trained a few more steps at ``4L`` with the training loop's step and
optimizer, then scored on ``4L`` windows.
"""

from __future__ import annotations

import numpy as np

from pipelines.evaluation import extrapolate
from pipelines.reproduce.claims import _a_lm
from pipelines.reproduce.core import Claim, Outcome, Settings

SCALED = ("linear", "ntk", "yarn")
VARIANTS = ("none", *SCALED)
FACTORS = (2, 4, 8)
FINETUNE_FACTOR = 4


def run(settings: Settings) -> Outcome:
  seq_len = settings.pick(tiny=32, small=128, large=512)
  exp, model, stream, _ = _a_lm.train_lm(
    seed=settings.seed,
    seq_len=seq_len,
    steps=settings.pick(tiny=20, small=300, large=3000),
    d_model=settings.pick(tiny=32, small=64, large=256),
    n_layers=settings.pick(tiny=1, small=2, large=6),
    batch_size=settings.pick(tiny=4, small=16, large=32),
    max_documents=settings.pick(tiny=40, small=200, large=0),
    lr=5e-3,
    progress=settings.progress,
  )
  count = settings.pick(tiny=2, small=8, large=32)
  lengths = [f * seq_len for f in FACTORS]

  def score(m, n):
    """Mean held-out loss over ``n``-token windows, and the mean past ``L``."""
    losses = extrapolate.position_losses(m, extrapolate.heldout_windows(stream, n, count), seq_len)
    return float(losses.mean()), float(losses[seq_len:].mean()) if n > seq_len else None

  zero_shot: dict[str, dict[str, dict[str, float]]] = {v: {} for v in VARIANTS}
  for n in lengths:
    for v in VARIANTS:
      cfg = extrapolate.variant_config(model.config, v, seq_len, n)
      mean, beyond = score(extrapolate.with_config(model, cfg), n)
      zero_shot[v][str(n)] = {"mean_loss": mean, "loss_beyond_train_len": beyond}
  inside = score(model, seq_len)[0]

  tune_len = FINETUNE_FACTOR * seq_len
  tune_steps = settings.pick(tiny=2, small=40, large=400)
  finetuned: dict[str, dict[str, float | list[float]]] = {}
  for v in VARIANTS:
    cfg = extrapolate.variant_config(model.config, v, seq_len, tune_len)
    tuned, losses = _a_lm.finetune_lm(
      exp,
      model,
      cfg,
      seq_len=tune_len,
      steps=tune_steps,
      batch_size=settings.pick(tiny=2, small=4, large=16),
      lr=1e-3,
      seed=settings.seed,
    )
    mean, beyond = score(tuned, tune_len)
    finetuned[v] = {"mean_loss": mean, "loss_beyond_train_len": beyond, "train_loss": losses}

  # Rule (fixed in advance): zero-shot, every scaled variant has a lower mean loss than none
  # at every length 2L, 4L, 8L; finetuned at 4L, linear has the lowest mean loss at 4L.
  zs_wins = {
    f"{v}@{n}": zero_shot[v][str(n)]["mean_loss"] < zero_shot["none"][str(n)]["mean_loss"]
    for v in SCALED
    for n in lengths
  }
  zero_shot_holds = all(zs_wins.values())
  best_tuned = min(VARIANTS, key=lambda v: finetuned[v]["mean_loss"])
  giraffe_holds = best_tuned == "linear"
  holds = zero_shot_holds and giraffe_holds

  def row(n):
    return ", ".join(f"{v} {zero_shot[v][str(n)]['mean_loss']:.2f}" for v in VARIANTS)

  measured = (
    f"zero-shot loss at 2L: {row(lengths[0])}; at 8L: {row(lengths[-1])} (L={seq_len}: "
    f"{inside:.2f}); scaled < none in {sum(zs_wins.values())}/{len(zs_wins)} cases; after "
    f"{tune_steps} steps at 4L: "
    + ", ".join(f"{v} {finetuned[v]['mean_loss']:.2f}" for v in VARIANTS)
    + f" (best {best_tuned})"
  )
  data = {
    "train_len": seq_len,
    "lengths": lengths,
    "windows": count,
    "loss_at_train_len": inside,
    "zero_shot": zero_shot,
    "zero_shot_wins": zs_wins,
    "finetune": {"length": tune_len, "steps": tune_steps, "lr": 1e-3, "variants": finetuned},
    "best_after_finetune": best_tuned,
    "zero_shot_holds": zero_shot_holds,
    "giraffe_holds": giraffe_holds,
  }
  parts = []
  if not zero_shot_holds:
    lost = [k for k, ok in zs_wins.items() if not ok]
    parts.append(f"zero-shot part fails at {', '.join(lost)}")
  if not giraffe_holds:
    parts.append(f"after the finetune {best_tuned}, not linear, has the lowest loss")
  note = (
    "Holds when every scaled variant beats none zero-shot at 2L, 4L and 8L and linear is best "
    "after the finetune at 4L" + (": " + "; ".join(parts) + "." if parts else ".")
  )

  def plot(fig):
    ax = fig.add_subplot(1, 2, 1)
    for v in VARIANTS:
      ax.plot(FACTORS, [zero_shot[v][str(n)]["mean_loss"] for n in lengths], "o-", label=v)
    ax.axhline(inside, color="gray", ls=":", lw=1, label="at L")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length / L (no finetune)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(fontsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    x = np.arange(len(VARIANTS))
    before = [zero_shot[v][str(tune_len)]["mean_loss"] for v in VARIANTS]
    after = [finetuned[v]["mean_loss"] for v in VARIANTS]
    ax2.bar(x - 0.2, before, 0.4, label="zero-shot")
    ax2.bar(x + 0.2, after, 0.4, label=f"after {tune_steps} steps at 4L")
    ax2.set_xticks(x, VARIANTS)
    ax2.set_ylim(min(after + before) * 0.9, max(after + before) * 1.05)
    ax2.set_xlabel("RoPE variant")
    ax2.set_ylabel(f"loss at 4L = {tune_len} (nats/token)")
    ax2.legend(fontsize=7)

  return Outcome(measured=measured, holds=holds, data=data, plot=plot, note=note)


CLAIM = Claim(
  name="rope_scaling",
  paper="PI / NTK / YaRN / Giraffe (Chen et al.; bloc97; Peng et al.; Pal et al., 2023)",
  statement=(
    "zero-shot, linear (PI), NTK and YaRN each give a lower loss than unscaled RoPE at 2L, 4L "
    "and 8L; after a short finetune at 4L, linear scaling gives the lowest loss (Giraffe)"
  ),
  run=run,
  minutes=8.0,
)
