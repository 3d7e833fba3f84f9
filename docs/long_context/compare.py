"""Loss by absolute position of two ``memzoo extrapolate`` results, as a picture and a table.

python docs/long_context/compare.py RUN_A RUN_B --labels "ABF short->long,short only" \
  --out docs/long_context/abf_vs_short.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("runs", nargs="+")
  p.add_argument("--labels", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--bin", type=int, default=32, help="positions per point of the curve")
  args = p.parse_args()
  labels = args.labels.split(",")
  results = [json.loads((Path(r) / "extrapolation.json").read_text()) for r in args.runs]
  longest = min(max(r["lengths"]) for r in results)
  fig, ax = plt.subplots(figsize=(7, 4))
  rows = []
  for label, res in zip(labels, results):
    losses = np.asarray(res["variants"]["none"]["perplexity"][str(longest)]["position_loss"])
    binned = losses[: len(losses) // args.bin * args.bin].reshape(-1, args.bin).mean(axis=1)
    x = (np.arange(len(binned)) + 0.5) * args.bin
    ax.plot(x, binned, label=f"{label} (trained at L={res['train_len']})")
    ax.axvline(res["train_len"], ls=":", color=ax.lines[-1].get_color())
    per_length = res["variants"]["none"]["perplexity"]
    means = {int(n): v["mean_loss"] for n, v in per_length.items()}
    rows.append((label, res["train_len"], means))
  ax.set_xlabel(f"position in a held-out window of {longest} tokens")
  ax.set_ylabel(f"loss (nats/token, mean over {args.bin} positions)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  lengths = sorted({n for _, _, d in rows for n in d})
  print("| run | L | " + " | ".join(f"loss@{n}" for n in lengths) + " |")
  print("|---|---|" + "---|" * len(lengths))
  for label, train_len, d in rows:
    cells = " | ".join(f"{d[n]:.3f}" if n in d else "" for n in lengths)
    print(f"| {label} | {train_len} | {cells} |")


if __name__ == "__main__":
  main()
