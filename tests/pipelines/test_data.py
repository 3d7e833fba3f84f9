"""Data: packing, segment ids, held-out split, determinism, iterator state, vocab checks."""

import json

import numpy as np
import pytest

from pipelines.config import DataConfig
from pipelines.data import corpus as corpora
from pipelines.data import loader
from pipelines.data.packing import PackedSequences, check_vocab, pack
from pipelines.data.tokenizer import BOS, EOS, ByteTokenizer


def docs(*texts):
  return [corpora.Document(f"d{i}", t) for i, t in enumerate(texts)]


def test_tokenizer_roundtrip():
  tok = ByteTokenizer()
  text = "héllo, wörld ✓"
  ids = tok.encode(text, bos=True, eos=True)
  assert ids[0] == BOS and ids[-1] == EOS
  assert tok.decode(ids) == text


def test_packing_segments_and_loss_mask():
  tok = ByteTokenizer()
  tokens, doc_ids = pack(docs("abc", "de", "fghij"), tok)
  assert len(tokens) == 5 + 4 + 7
  src = PackedSequences(tokens, doc_ids, seq_len=6)
  assert len(src) == (len(tokens) - 1) // 6
  seen = []
  for i in range(len(src)):
    ex = src[i]
    np.testing.assert_array_equal(ex["targets"][:-1], ex["inputs"][1:])
    seg = ex["segment_ids"]
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
    # A target is masked exactly when it belongs to the next document.
    nxt = np.concatenate([seg[1:], [doc_ids[(i + 1) * 6] - doc_ids[i * 6] + 1]])
    np.testing.assert_array_equal(ex["loss_mask"] > 0, seg == nxt)
    seen.append(ex["inputs"])
  # Every token of the stream (but the tail) is an input exactly once, in order.
  np.testing.assert_array_equal(np.concatenate(seen), tokens[: len(src) * 6])


def test_masked_targets_are_document_starts():
  tok = ByteTokenizer()
  tokens, doc_ids = pack(docs("ab", "cd", "ef", "gh"), tok)
  ex = PackedSequences(tokens, doc_ids, seq_len=12)[0]
  masked = ex["targets"][ex["loss_mask"] == 0]
  assert np.all(masked == BOS)


def test_vocab_check():
  check_vocab(np.array([0, 259]), 260)
  with pytest.raises(ValueError, match="vocab_size is 200"):
    check_vocab(np.array([0, 259]), 200)


def test_heldout_split_is_disjoint_and_stable():
  c = corpora.Corpus(tuple(docs(*[f"text {i}" for i in range(200)])), {})
  train, heldout = c.split(0.1)
  assert {d.name for d in train}.isdisjoint({d.name for d in heldout})
  assert len(train) + len(heldout) == 200 and 5 <= len(heldout) <= 40
  assert c.split(0.1) == (train, heldout)


def test_stdlib_corpus_manifest():
  c = corpora.stdlib_corpus(max_documents=20)
  assert c.manifest["files"] == 20 and len(c.manifest["sha256"]) == 64
  assert corpora.stdlib_corpus(max_documents=20).manifest == c.manifest


def test_text_and_jsonl_sources(tmp_path):
  (tmp_path / "a.txt").write_text("alpha " * 50)
  (tmp_path / "b.md").write_text("beta " * 50)
  c = corpora.text_corpus([str(tmp_path)])
  assert [d.name.split("/")[-1] for d in c.documents] == ["a.txt", "b.md"]
  jl = tmp_path / "d.jsonl"
  jl.write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(5)))
  j = corpora.jsonl_corpus([str(jl)])
  assert len(j.documents) == 5
  jl.write_text('{"body": "x"}\n')
  with pytest.raises(ValueError, match="no string field 'text'"):
    corpora.jsonl_corpus([str(jl)])
  with pytest.raises(FileNotFoundError):
    corpora.text_corpus([str(tmp_path / "missing")])


def _cfg(**kw):
  return DataConfig(
    **{"source": "stdlib", "max_documents": 40, "seq_len": 32, "batch_size": 4, **kw}
  )


def test_training_order_deterministic_and_resumable():
  data = loader.build(_cfg(), vocab_size=260)
  a = iter(loader.train_dataset(data.train, 4, seed=1))
  b = iter(loader.train_dataset(data.train, 4, seed=1))
  c = iter(loader.train_dataset(data.train, 4, seed=2))
  first = [next(a) for _ in range(3)]
  for x in first:
    np.testing.assert_array_equal(x["inputs"], next(b)["inputs"])
  assert not np.array_equal(first[0]["inputs"], next(c)["inputs"])
  state = a.get_state()
  expected = [next(a)["inputs"] for _ in range(2)]
  fresh = iter(loader.train_dataset(data.train, 4, seed=1))
  fresh.set_state(json.loads(json.dumps(state)))  # the state survives JSON (the checkpoint)
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["inputs"], e)


def test_build_records_manifest_and_refuses_small_vocab():
  data = loader.build(_cfg(), vocab_size=260)
  m = data.manifest
  assert m["train_documents"] + m["heldout_documents"] == 40
  assert 0 < m["unigram_bits_per_byte"] < 8
  with pytest.raises(ValueError, match="vocab_size"):
    loader.build(_cfg(), vocab_size=128)
