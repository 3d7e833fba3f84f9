"""Plots for reports: loss by position per length/variant, needle heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def log_binned(y: np.ndarray, bins_per_octave: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """Mean of ``y`` over log-spaced position bins: (bin centres, means). Per-token losses are
  noisy; geometric bins keep early positions resolved and average late ones."""
  n = len(y)
  edges = np.unique(np.round(2 ** np.arange(0, np.log2(n) + 1e-9, 1 / bins_per_octave)).astype(int))
  edges = np.concatenate([[0], edges[edges < n], [n]])
  centres, means = [], []
  for lo, hi in zip(edges[:-1], edges[1:]):
    if hi > lo:
      centres.append(np.sqrt(max(lo, 1) * hi))
      means.append(float(np.mean(y[lo:hi])))
  return np.asarray(centres), np.asarray(means)


def loss_by_position(results: dict[str, Any], path: Path, title: str) -> Path:
  """One panel per total length: loss against position (log-binned), one line per variant."""
  variants = results["variants"]
  lengths = results["lengths"]
  fig, axes = plt.subplots(
    1, len(lengths), figsize=(4.2 * len(lengths), 3.6), dpi=110, sharey=True, squeeze=False
  )
  train_len = results["train_len"]
  for ax, n in zip(axes[0], lengths):
    for name, v in variants.items():
      x, y = log_binned(np.asarray(v["perplexity"][str(n)]["position_loss"]))
      ax.plot(x, y, marker=".", lw=1.2, label=name)
    ax.axvline(train_len, color="k", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_title(f"total length {n}")
    ax.set_xlabel("position (log scale)")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("loss (nats / token)")
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(f"{title}: held-out loss by position (dashed: training length)")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def needle_heatmap(cells: list[dict[str, Any]], path: Path, title: str) -> Path:
  """Accuracy by needle depth (rows) x context length (columns), with a colour bar."""
  depths = sorted({c["depth"] for c in cells})
  lengths = sorted({c["length"] for c in cells})
  acc = np.full((len(depths), len(lengths)), np.nan)
  for c in cells:
    acc[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
  fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2), dpi=110)
  im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  for i in range(len(depths)):
    for j in range(len(lengths)):
      if not np.isnan(acc[i, j]):
        ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
  fig.colorbar(im, ax=ax, label="accuracy")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
