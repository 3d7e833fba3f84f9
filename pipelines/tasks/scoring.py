"""Scoring synthetic tasks: exact match per answer span, averaged per example and over a source.

Scoring is teacher-forced: the model sees the true answer prefix, so a span is exact-matched
iff greedy decoding from the span's start would reproduce it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from pipelines.errors import InputError


def score(pred_ids: np.ndarray, batch: Mapping[str, Any]) -> np.ndarray:
  """Per-example accuracy: the fraction of answer spans predicted exactly.

  For tasks with one answer span (passkey, single needle, yes/no tasks) this is exact match.

  Args:
    pred_ids: predicted next-token ids ``[B, T]`` (or ``[T]``), e.g. the argmax of the logits;
      only positions inside answer spans are read.
    batch: examples with ``targets`` and ``answer_spans`` of the same shape.

  Returns:
    float64 ``[B]`` (or a scalar for ``[T]`` input) in ``[0, 1]``.
  """
  pred = np.asarray(pred_ids)
  targets, spans = np.asarray(batch["targets"]), np.asarray(batch["answer_spans"])
  if pred.shape != targets.shape or spans.shape != targets.shape:
    raise InputError(
      f"pred_ids {pred.shape}, targets {targets.shape} and answer_spans {spans.shape} differ"
    )
  one = pred.ndim == 1
  pred, targets, spans = np.atleast_2d(pred), np.atleast_2d(targets), np.atleast_2d(spans)
  num = int(spans.max(initial=0))
  if num == 0:
    raise InputError("no answer spans in the batch")
  k = np.arange(1, num + 1)[:, None, None]  # [num, 1, 1]
  in_span = spans[None] == k  # [num, B, T]
  wrong = in_span & (pred != targets)[None]
  present = in_span.any(-1)  # [num, B]
  correct = present & ~wrong.any(-1)
  acc = correct.sum(0) / np.maximum(present.sum(0), 1)
  return acc[0] if one else acc


def evaluate(
  predict_fn: Callable[[np.ndarray], Any],
  source: Any,
  n: int,
  *,
  batch_size: int = 8,
) -> dict[str, float | int]:
  """Mean accuracy of ``predict_fn`` on examples ``0 .. n-1`` of ``source``.

  Every batch has ``batch_size`` rows (the last one is filled with repeats that are not
  counted), so a jitted ``predict_fn`` compiles once.

  Args:
    predict_fn: ``inputs`` int32 ``[B, T]`` -> logits ``[B, T, V]`` (numpy or jax).
    source: a task source (``__getitem__`` returning examples of one length).
    n: examples to score, at most ``len(source)``.
    batch_size: rows per call.

  Returns:
    ``{"accuracy": mean per-example accuracy, "n": n}``.
  """
  n, batch_size = int(n), int(batch_size)
  if not 1 <= n <= len(source):
    raise InputError(f"n must be in [1, {len(source)}], got {n}")
  if batch_size < 1:
    raise InputError(f"batch_size must be >= 1, got {batch_size}")
  total = 0.0
  for lo in range(0, n, batch_size):
    idx = [min(i, n - 1) for i in range(lo, lo + batch_size)]
    examples = [source[i] for i in idx]
    batch = {k: np.stack([e[k] for e in examples]) for k in ("inputs", "targets", "answer_spans")}
    logits = np.asarray(predict_fn(batch["inputs"]))
    if logits.ndim != 3 or logits.shape[:2] != batch["inputs"].shape:
      raise InputError(f"predict_fn returned {logits.shape}, expected [B, T, V]")
    acc = score(logits.argmax(-1), batch)
    total += float(acc[: min(batch_size, n - lo)].sum())
  return {"accuracy": total / n, "n": n}
