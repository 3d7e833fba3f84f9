"""InfLLM (Xiao et al., 2024): a transformer trained at ``L`` tokens, wrapped without training in
InfLLM's block memory, retrieves a passkey at ``8 L`` far better than the plain transformer.

A small Llama-style transformer is trained on passkey retrieval at ``L`` (``train_on_task``);
its parameters become a run directory, and the memory grid of ``memzoo eval --suite memory``
(``pipelines.evaluation.suite.memory_grid``) scores the same weights under plain attention
(``none``: RoPE positions past ``L`` unchanged) and under InfLLM (4 sinks + ``L / 2`` local
tokens + the top 4 of the blocks of ``L / 8`` tokens, ``pipelines.evaluation.memories``) at
``1 .. 8 x L``, with the needle at three depths.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import zoo
from pipelines.evaluation import suite
from pipelines.reproduce.claims._b_common import write_run
from pipelines.reproduce.core import Claim, Outcome, Settings
from pipelines.tasks import get as get_task
from pipelines.tasks.training import Budget, train_on_task

METHODS = ("none", "infllm")
DEPTHS = (0.0, 0.5, 1.0)
# The verdict: InfLLM's mean passkey accuracy at 8x L is at least 0.5 and at least MARGIN above
# the plain transformer's at 8x L.
MARGIN = 0.25
FLOOR = 0.5


def _mean_acc(res: dict[str, Any]) -> dict[str, dict[int, float]]:
  acc: dict[str, dict[int, list[float]]] = {}
  for c in res["cells"]:
    acc.setdefault(c["method"], {}).setdefault(int(c["length"]), []).append(c["accuracy"])
  return {m: {n: float(np.mean(v)) for n, v in by.items()} for m, by in acc.items()}


def run(settings: Settings) -> Outcome:
  train_len = settings.pick(tiny=128, small=256, large=512)
  digits = settings.pick(tiny=3, small=3, large=5)
  budget = Budget(
    steps=settings.pick(tiny=3, small=300, large=2000),
    batch_size=settings.pick(tiny=4, small=16, large=32),
    lr=3e-3,
    eval_examples=settings.pick(tiny=4, small=64, large=256),
  )
  factors = settings.pick(tiny=(1, 2), small=(1, 2, 4, 8), large=(1, 2, 4, 8))
  n = settings.pick(tiny=1, small=8, large=32)
  width = settings.pick(tiny=32, small=64, large=128)
  cfg = zoo.config(
    "transformer", "tiny", d_model=width, n_layers=2, n_heads=4, n_kv_heads=2,
    d_ff=2 * width, max_len=train_len,
  )  # fmt: skip
  kw = {"length": train_len, "num_digits": digits}
  train = get_task("passkey", seed=settings.seed, **kw)
  held_out = get_task("passkey", seed=settings.seed + 10_000, **kw)
  trained = train_on_task(
    cfg, train, held_out, budget, seed=settings.seed, progress=settings.progress
  )
  with tempfile.TemporaryDirectory() as tmp:
    run_dir = write_run(cfg, trained["params"], Path(tmp) / "run", train_len)
    res = suite.memory_grid(
      run_dir, methods=METHODS, factors=factors, depths=DEPTHS, tasks=("passkey",), n=n,
      task_params={"passkey": {"num_digits": digits}},
    )  # fmt: skip
  acc = _mean_acc(res)
  lengths = [int(x) for x in res["lengths"]]
  far = lengths[-1]
  far_x = far // train_len
  inf, plain = acc["infllm"][far], acc["none"][far]
  holds = inf >= FLOOR and inf >= plain + MARGIN
  kv = {m["method"]: m["kv_bytes"] for m in res["memory"] if m["length"] == far}
  data = {
    "train_len": train_len,
    "lengths": lengths,
    "digits": digits,
    "depths": list(DEPTHS),
    "examples_per_cell": n,
    "steps": budget.steps,
    "train_accuracy_at_L": float(trained["accuracy"]),
    "last_loss": float(trained["last_loss"]),
    "accuracy": {m: [acc[m][x] for x in lengths] for m in METHODS},
    "kv_bytes_at_far": kv,
    "options": res["options"],
  }

  def plot(fig):
    ax = fig.add_subplot()
    for m, label in (("none", "plain transformer"), ("infllm", "InfLLM (same weights)")):
      ax.plot(lengths, data["accuracy"][m], marker="o", label=label)
    ax.axvline(train_len, color="grey", ls=":", lw=1, label=f"trained length L={train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{x}\n({x // train_len}x)" for x in lengths])
    ax.minorticks_off()
    ax.set(xlabel="input length (tokens)", ylabel=f"passkey accuracy ({digits} digits)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8)

  measured = (
    f"passkey accuracy at {far_x}x L={train_len}: InfLLM {inf:.2f}, plain {plain:.2f} "
    f"(at 1x: {acc['infllm'][lengths[0]]:.2f} / {acc['none'][lengths[0]]:.2f}; "
    f"held-out at L after training {trained['accuracy']:.2f})"
  )
  return Outcome(measured=measured, holds=bool(holds), data=data, plot=plot)


CLAIM = Claim(
  name="infllm",
  paper="InfLLM (Xiao et al., 2024)",
  statement=(
    f"a transformer trained at L, wrapped training-free in InfLLM's block memory, retrieves a "
    f"passkey at 8x L far better than the plain transformer (InfLLM >= {FLOOR} and >= plain + "
    f"{MARGIN})"
  ),
  run=run,
  minutes=8.0,
)
