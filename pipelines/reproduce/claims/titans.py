"""Titans (Behrouz et al., 2024): memory as context (MAC) retrieves a needle past its training
length, where a sliding-window transformer whose window equals MAC's segment cannot.

Both models (d_model 64, 2 layers) are trained with ``train_on_task`` on passkey retrieval at
``L`` tokens with the needle at a random depth, then scored on held-out passkeys at ``L``,
``2 L`` and ``4 L`` (full forward passes; both are built for ``4 L`` positions, which adds no
parameters). The window (= MAC's segment) is shorter than the question that follows the
needle, so attention alone cannot reach the key; MAC's neural memory can carry it.
"""

from __future__ import annotations

from typing import Any

import zoo
from pipelines.reproduce.claims._b_common import train_and_score
from pipelines.reproduce.core import Claim, Outcome, Settings
from pipelines.tasks import get as get_task
from pipelines.tasks.training import Budget

MODELS = ("MAC", "sliding window")
FACTORS = (1, 2, 4)
# The verdict: at 2x and at 4x L, MAC's passkey accuracy exceeds the sliding-window
# transformer's by at least MARGIN.
MARGIN = 0.2


def configs(train_len: int, segment: int, width: int) -> dict[str, Any]:
  max_len = FACTORS[-1] * train_len
  return {
    "MAC": zoo.config(
      "titans", "tiny", variant="mac", d_model=width, segment_size=segment, window=segment,
      max_len=max_len, chunk_size=8,
    ),
    "sliding window": zoo.config(
      "transformer", "tiny", d_model=width, n_heads=4, n_kv_heads=4, d_ff=3 * width,
      window=segment, max_len=max_len,
    ),
  }  # fmt: skip


def run(settings: Settings) -> Outcome:
  train_len = settings.pick(tiny=112, small=128, large=256)
  segment = settings.pick(tiny=16, small=32, large=32)
  width = settings.pick(tiny=32, small=64, large=128)
  digits = settings.pick(tiny=3, small=3, large=5)
  budget = Budget(
    steps=settings.pick(tiny=2, small=300, large=2000),
    batch_size=settings.pick(tiny=2, small=16, large=32),
    lr=3e-3,
    eval_examples=settings.pick(tiny=2, small=64, large=256),
  )
  s = settings.seed
  train = get_task("passkey", length=train_len, num_digits=digits, seed=s)
  held_out = {
    f"{f}x": get_task("passkey", length=f * train_len, num_digits=digits, seed=s + 10_000 + f)
    for f in FACTORS
  }
  acc: dict[str, list[float]] = {}
  losses: dict[str, list[float]] = {}
  for name, cfg in configs(train_len, segment, width).items():
    out = train_and_score(cfg, train, held_out, budget, seed=s, progress=settings.progress)
    acc[name] = [out["accuracy"][f"{f}x"] for f in FACTORS]
    losses[name] = [float(out["first_loss"]), float(out["last_loss"])]
  lengths = [f * train_len for f in FACTORS]
  ahead = {f"{f}x": acc["MAC"][i] - acc["sliding window"][i] for i, f in enumerate(FACTORS)}
  holds = all(ahead[f"{f}x"] >= MARGIN for f in FACTORS if f > 1)
  data = {
    "train_len": train_len,
    "segment": segment,
    "lengths": lengths,
    "digits": digits,
    "steps": budget.steps,
    "eval_examples": budget.eval_examples,
    "accuracy": acc,
    "loss_first_last": losses,
    "mac_minus_window": ahead,
  }

  def plot(fig):
    ax = fig.add_subplot()
    for name in MODELS:
      label = f"{name} (window {segment})" if name != "MAC" else f"Titans MAC (segment {segment})"
      ax.plot(lengths, acc[name], marker="o", label=label)
    ax.axvline(train_len, color="grey", ls=":", lw=1, label=f"trained length L={train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n}\n({n // train_len}x)" for n in lengths])
    ax.minorticks_off()
    ax.set(xlabel="input length (tokens)", ylabel=f"passkey accuracy ({digits} digits)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8)

  fmt = lambda name: " / ".join(f"{a:.2f}" for a in acc[name])  # noqa: E731
  measured = (
    f"passkey accuracy at 1x / 2x / 4x L={train_len}: MAC {fmt('MAC')}, sliding window "
    f"{fmt('sliding window')}"
  )
  return Outcome(measured=measured, holds=bool(holds), data=data, plot=plot)


CLAIM = Claim(
  name="titans",
  paper="Titans (Behrouz et al., 2024)",
  statement=(
    "Titans MAC retrieves a passkey past its training length L where a sliding-window "
    f"transformer with MAC's segment as window cannot (MAC >= window + {MARGIN} at 2x and 4x L)"
  ),
  run=run,
  minutes=8.0,
)
