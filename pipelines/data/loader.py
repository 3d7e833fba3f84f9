"""The grain pipelines used by training and evaluation."""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import numpy as np

from pipelines.config import DataConfig
from pipelines.data import corpus as corpora
from pipelines.data import mixture
from pipelines.data.packing import PackedSequences, check_vocab, pack, unigram_bits_per_byte
from pipelines.data.tokenizer import ByteTokenizer
from pipelines.errors import InputError


@dataclasses.dataclass
class Data:
  train: PackedSequences
  heldout: PackedSequences
  manifest: dict[str, Any]
  tokenizer: Any  # a pipelines.data.hf_tokenizer tokenizer


def load_corpus(cfg: DataConfig) -> corpora.Corpus:
  if cfg.source == "stdlib":
    return corpora.stdlib_corpus(cfg.max_documents)
  if cfg.source == "text":
    return corpora.text_corpus(cfg.paths, cfg.max_documents)
  return corpora.jsonl_corpus(cfg.paths, cfg.jsonl_field, cfg.max_documents)


def build(
  cfg: DataConfig, vocab_size: int, tokenizer: Any = None, single_stream: bool = False
) -> Data:
  """Reads the corpus, splits it, packs both sides and checks ids against ``vocab_size``.

  ``tokenizer``: the run's (``pipelines.data.hf_tokenizer.load_tokenizer(exp)``); ``None`` is only
  allowed for ``data.tokenizer: byte``. ``single_stream``: one document per row (for models that
  refuse packed ``segment_ids``).
  """
  if tokenizer is None:
    if cfg.tokenizer != "byte":
      raise InputError(
        f"data.tokenizer={cfg.tokenizer!r}: pass the run's tokenizer (load_tokenizer(exp))"
      )
    tokenizer = ByteTokenizer()
  tok = tokenizer
  corpus = load_corpus(cfg)
  train_docs, heldout_docs = corpus.split(cfg.heldout_fraction)
  train_tokens, train_docids = pack(train_docs, tok)
  heldout_tokens, heldout_docids = pack(heldout_docs, tok)
  check_vocab(train_tokens, vocab_size, "training data")
  check_vocab(heldout_tokens, vocab_size, "held-out data")
  train = PackedSequences(train_tokens, train_docids, cfg.seq_len, single_stream)
  heldout = PackedSequences(heldout_tokens, heldout_docids, cfg.seq_len, single_stream)
  manifest = dict(corpus.manifest)
  manifest.update(
    train_documents=len(train_docs),
    heldout_documents=len(heldout_docs),
    train_tokens=int(len(train_tokens)),
    heldout_tokens=int(len(heldout_tokens)),
    train_sequences=len(train),
    heldout_sequences=len(heldout),
    unigram_bits_per_byte=unigram_bits_per_byte(train_tokens, heldout, 64, tok.token_bytes()),
    tokenizer=getattr(tok, "name", "byte"),
  )
  return Data(train, heldout, manifest, tok)


def train_dataset(source: PackedSequences, batch_size: int, seed: int) -> grain.IterDataset:
  """Shuffled, repeated, batched; this process's share of every global batch.

  The order depends only on ``seed``; the iterator's ``get_state()`` is saved with checkpoints.
  """
  return _batched(grain.MapDataset.source(source).shuffle(seed=seed).repeat(), batch_size)


def with_seq_len(source: PackedSequences, seq_len: int) -> PackedSequences:
  """The same token stream cut into rows of ``seq_len`` (a curriculum stage's length)."""
  if source.seq_len == seq_len:
    return source
  return PackedSequences(source.tokens, source.doc_ids, seq_len, source.single_stream)


def mixture_dataset(
  cfg: DataConfig, data: Data, vocab_size: int, seed: int, single_stream: bool = False
) -> grain.IterDataset:
  """The training stream of ``cfg`` (one stage's data settings): ``data.mixture`` when set,
  else ``data.train`` alone, at ``cfg.seq_len``, with synthesized positions when
  ``cfg.position_factor > 1``; batched like :func:`train_dataset` (which it equals without a
  mixture or position synthesis)."""
  train = with_seq_len(data.train, cfg.seq_len)
  if not cfg.mixture:
    ds = grain.MapDataset.source(train).shuffle(seed=seed).repeat()
  else:
    stream = (data.train.tokens, data.train.doc_ids)
    sources = [
      mixture.build_source(
        src,
        cfg,
        stream,
        vocab_size=vocab_size,
        tokenizer=data.tokenizer,
        seed=mixture.source_seed(seed, i),
        single_stream=single_stream,
      )
      for i, src in enumerate(cfg.mixture)
    ]
    ds = mixture.mix(sources, [s.weight for s in cfg.mixture], seed)
  if cfg.position_factor > 1:
    ds = mixture.with_positions(ds, cfg.position_factor, cfg.position_chunks, seed)
  return _batched(ds, cfg.batch_size)


def _batched(ds: grain.MapDataset, batch_size: int) -> grain.IterDataset:
  n_proc, proc = jax.process_count(), jax.process_index()
  if batch_size % n_proc:
    raise InputError(f"data.batch_size={batch_size} must be divisible by {n_proc} processes")
  ds = ds.batch(batch_size, drop_remainder=True)
  if n_proc > 1:
    ds = ds.map(lambda b: {k: v[proc::n_proc] for k, v in b.items()})
  return ds.to_iter_dataset()


def heldout_batches(
  source: PackedSequences, batch_size: int, n: int
) -> list[dict[str, np.ndarray]]:
  """The first ``n`` held-out batches in order (the same every evaluation)."""
  out = []
  for b in range(n):
    items = [source[i] for i in range(b * batch_size, (b + 1) * batch_size) if i < len(source)]
    if len(items) < batch_size:
      break
    out.append({k: np.stack([it[k] for it in items]) for k in items[0]})
  if not out:
    raise InputError(f"held-out split has {len(source)} sequences: fewer than one batch")
  return out
