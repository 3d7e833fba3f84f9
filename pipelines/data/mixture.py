"""Training mixtures of several sources, and position synthesis for long-context training.

Mixture (``data.mixture``): every source becomes a grain random-access source of rows of
``seq_len`` tokens (the keys of :class:`pipelines.data.packing.PackedSequences`); each is
shuffled with its own seed (derived from the run seed and the source's index) and repeated, and
``grain.MapDataset.mix`` interleaves them in proportion to the weights. ``mix`` is a fixed
weighted interleave, so row ``i`` of the mixture is a pure function of ``i`` and the seed: the
iterator's state is one index, saved with checkpoints, and a resumed run reads the same rows.
The held-out split always comes from ``data.source``.

Sources (:class:`pipelines.config.SourceConfig`):

- ``corpus``: the training documents of ``data.source``, optionally only those with
  ``min_tokens <= length < max_tokens`` (the embedded corpus split into long and short
  documents; ProLong keeps short, high-quality data in the long-context mix).
- ``text`` / ``jsonl``: local files, split into train/held-out like the main corpus (only the
  train side is mixed in).
- ``task``: a synthetic task stream of ``pipelines.tasks`` (one example per row, its loss on the
  answer tokens only).

Position synthesis (``data.position_factor = k > 1``): a model trained on rows of ``L`` tokens
sees position ids spread over ``[0, kL)``, so RoPE angles of a long context are trained without
long rows (LOGO's positional-index synthesis, after PoSE). We keep *contiguous chunks*: each
document in a row is cut into ``position_chunks`` pieces at random points; inside a piece the
positions stay consecutive, and a random, non-decreasing skip is added from one piece to the
next (the skips are sorted uniform draws from ``[0, kL - n]`` for a document of ``n`` tokens in
the row). Why chunks and not independent sorted random positions (randomized positional
encodings): next-token prediction leans on neighbours at distance 1, 2, ...; independent draws
would put gaps between almost every pair of adjacent tokens, so the model would never see the
short distances it meets at inference, while chunks keep local structure intact and still show
long distances between pieces. The first piece starts at 0 (a document start reads as it will
at inference), positions are strictly increasing within a document and stay below ``kL``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from pipelines.config import DataConfig, SourceConfig
from pipelines.data import corpus as corpora
from pipelines.data.packing import PackedSequences, check_vocab, pack
from pipelines.errors import InputError

ROW_KEYS = ("inputs", "targets", "segment_ids", "loss_mask")
TASK_EXAMPLES = 1_000_000  # procedural: any count works; large so a run never repeats one


def source_seed(seed: int, index: int) -> int:
  """The shuffle seed of source ``index`` of a mixture (independent orders per source)."""
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def select_documents(
  tokens: np.ndarray, doc_ids: np.ndarray, min_tokens: int = 0, max_tokens: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """The packed stream restricted to documents of ``min_tokens <= length < max_tokens``
  (0 = no bound); document ids are renumbered contiguously."""
  lengths = np.bincount(doc_ids)
  keep = lengths >= min_tokens
  if max_tokens:
    keep &= lengths < max_tokens
  keep &= lengths > 0
  mask = keep[doc_ids]
  renumber = np.cumsum(keep) - 1
  return tokens[mask], renumber[doc_ids[mask]].astype(np.int32)


class TaskRows:
  """A synthetic task as mixture rows: the task's ``inputs, targets, segment_ids, loss_mask``."""

  def __init__(self, source: Any):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ex = self.source[operator.index(index)]
    return {
      "inputs": np.asarray(ex["inputs"], np.int32),
      "targets": np.asarray(ex["targets"], np.int32),
      # Task padding is segment 0: a segment of its own, never attended from the example.
      "segment_ids": np.asarray(ex["segment_ids"], np.int32),
      "loss_mask": np.asarray(ex["loss_mask"], np.float32),
    }

  def __repr__(self) -> str:
    return f"TaskRows({self.source!r})"


def build_source(
  src: SourceConfig,
  cfg: DataConfig,
  train_stream: tuple[np.ndarray, np.ndarray],
  *,
  vocab_size: int,
  tokenizer: Any,
  seed: int,
  single_stream: bool = False,
) -> Any:
  """A random-access source of rows of ``cfg.seq_len`` for one mixture entry.

  ``train_stream``: (tokens, doc_ids) of the training split of ``data.source``.
  """
  what = f"data.mixture source {src.label!r}"
  if src.kind == "task":
    from pipelines.tasks import registry

    try:
      task = registry.get(
        src.task,
        length=cfg.seq_len,
        seed=seed,
        num_examples=TASK_EXAMPLES,
        tokenizer=tokenizer,
        **dict(src.task_args),
      )
    except KeyError as e:
      raise InputError(f"{what}: {e.args[0]}") from None
    except TypeError as e:
      raise InputError(f"{what}: task_args: {e}") from None
    rows = TaskRows(task)
    check_vocab(rows[0]["inputs"], vocab_size, what)
    return rows
  if src.kind == "corpus":
    tokens, doc_ids = train_stream
  else:
    if src.kind == "text":
      corpus = corpora.text_corpus(src.paths, cfg.max_documents)
    else:
      corpus = corpora.jsonl_corpus(src.paths, src.jsonl_field, cfg.max_documents)
    train_docs, _ = corpus.split(cfg.heldout_fraction)
    tokens, doc_ids = pack(train_docs, tokenizer)
    check_vocab(tokens, vocab_size, what)
  if src.min_tokens or src.max_tokens:
    tokens, doc_ids = select_documents(tokens, doc_ids, src.min_tokens, src.max_tokens)
    if len(tokens) < cfg.seq_len + 1:
      bound = f"[{src.min_tokens}, {src.max_tokens or 'inf'})"
      raise InputError(
        f"{what}: documents of {bound} tokens hold only {len(tokens)} tokens, too few for "
        f"one row of {cfg.seq_len}; widen the bounds"
      )
  return PackedSequences(tokens, doc_ids, cfg.seq_len, single_stream)


def mix(sources: Sequence[Any], weights: Sequence[float], seed: int) -> grain.MapDataset:
  """Rows of ``sources`` interleaved in proportion to ``weights``: each source shuffled with
  :func:`source_seed` and repeated, then ``grain.MapDataset.mix`` (infinite)."""
  parts = [
    grain.MapDataset.source(s).shuffle(seed=source_seed(seed, i)).repeat()
    for i, s in enumerate(sources)
  ]
  if len(parts) == 1:
    return parts[0]
  total = float(sum(weights))
  return grain.MapDataset.mix(parts, [w / total for w in weights])


def synthesize_positions(
  segment_ids: np.ndarray, span: int, chunks: int, rng: np.random.Generator
) -> np.ndarray:
  """Position ids ``[L]`` int32 over ``[0, span)`` for one row (see the module docstring).

  Each document (run of equal ``segment_ids``) of ``n`` tokens is cut into up to ``chunks``
  contiguous pieces; piece ``j`` is shifted by ``u_j``, with ``0 = u_0 <= u_1 <= ...`` sorted
  uniform draws from ``[0, span - n]``: strictly increasing within the document, below ``span``.
  """
  n_row = len(segment_ids)
  if span < n_row:
    raise ValueError(f"span {span} is shorter than the row ({n_row})")
  out = np.empty(n_row, np.int64)
  starts = np.flatnonzero(np.diff(segment_ids, prepend=segment_ids[0] - 1))
  ends = np.append(starts[1:], n_row)
  for lo, hi in zip(starts, ends):
    n = int(hi - lo)
    pieces = min(chunks, n)
    cuts = np.sort(rng.choice(np.arange(1, n), pieces - 1, replace=False)) if pieces > 1 else []
    skips = np.sort(rng.integers(0, span - n + 1, size=pieces - 1))
    offset = np.zeros(n, np.int64)
    for cut, skip in zip(cuts, skips):
      offset[cut:] = skip  # later cuts overwrite: pieces after cut j get skip j (sorted)
    out[lo:hi] = np.arange(n) + offset
  return out.astype(np.int32)


def with_positions(ds: grain.MapDataset, factor: float, chunks: int, seed: int) -> Any:
  """``ds`` rows with a ``positions`` entry over ``[0, factor * L)``, drawn from
  ``default_rng((seed, row index))`` (deterministic, so resume reads the same positions)."""

  def add(index: int, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((seed, 0x9E3779B9, index))
    span = int(round(factor * len(row["inputs"])))
    return {**row, "positions": synthesize_positions(row["segment_ids"], span, chunks, rng)}

  return ds.map_with_index(add)
