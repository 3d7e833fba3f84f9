"""A run's own tokenizer: recorded in ``data.tokenizer``, copied by ``import-hf`` and into an HF
export, and used by data loading (bits per byte), the synthetic tasks (ids from the model's
vocabulary, question and answer encoded as one text, lengths in tokens) and the memory grid."""

import shutil

import numpy as np
import pytest
import yaml

from pipelines import config as config_lib
from pipelines.cli import main as cli_main
from pipelines.data import hf_tokenizer as tokenizers
from pipelines.data import loader
from pipelines.data.tokenizer import ByteTokenizer
from tests.pipelines.tiny_hf import VOCAB, bpe_tokenizer, hf_model

tk = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """(tokenizers.Tokenizer, our HFTokenizer) of a small BPE trained here."""
  path = tmp_path_factory.mktemp("bpe")
  ref = bpe_tokenizer(path, bos_prefix=False)
  return ref, tokenizers.load(path)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("imp")
  hf_model(tmp / "hf")
  bpe_tokenizer(tmp / "hf")
  assert cli_main(["import-hf", str(tmp / "hf"), "--run", str(tmp / "run")]) == 0
  return tmp / "hf", tmp / "run"


def test_run_records_its_tokenizer_and_load_tokenizer_reads_it(imported, tmp_path):
  hf_dir, run = imported
  cfg = yaml.safe_load((run / "config.yaml").read_text())
  assert cfg["data"]["tokenizer"] == "tokenizer.json"
  assert (run / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
  tok = tokenizers.load_tokenizer(run)
  ref = tk.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
  text = "memory models remember the pass key"
  assert tok.encode(text).tolist() == ref.encode(text, add_special_tokens=False).ids
  assert tok.encode_prompt(text).tolist() == ref.encode(text).ids  # its own BOS template
  # The path is relative to the run: a moved run still finds its tokenizer.
  moved = shutil.copytree(run, tmp_path / "moved")
  assert tokenizers.load_tokenizer(moved).encode(text).tolist() == tok.encode(text).tolist()
  (moved / "tokenizer.json").unlink()
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tokenizers.load_tokenizer(moved)


def test_runs_trained_here_default_to_bytes(tmp_path):
  exp = config_lib.from_dict({"run_dir": str(tmp_path)})
  assert exp.data.tokenizer == "byte"
  assert isinstance(tokenizers.load_tokenizer(exp), ByteTokenizer)
  # The byte tokenizer needs 260 ids; a model tokenizer with fewer is allowed.
  with pytest.raises(config_lib.ConfigError, match="byte tokenizer"):
    config_lib.from_dict({"model": {"vocab_size": 200}})
  small = {"model": {"vocab_size": 200}, "data": {"tokenizer": "tok.json"}}
  assert config_lib.from_dict(small).model.vocab_size == 200


def test_answer_is_encoded_with_its_question(bpe):
  ref, tok = bpe
  parts = [("The pass key is ", 0), ("12345", 1), (". Done", 0)]
  ids, marks = tok.encode_marked(parts)
  joined = ref.encode("The pass key is 12345. Done", add_special_tokens=False).ids
  assert ids.tolist() == joined
  piecewise = np.concatenate([tok.encode(t) for t, _ in parts])
  # Encoded piece by piece, the space before the digits is a token of its own: a segmentation
  # the model never sees in running text. Joint encoding is what changes the ids.
  assert piecewise.tolist() != joined
  assert tok.decode(ids[marks == 1]).strip() == "12345"
  assert set(np.unique(marks)) == {0, 1}


def test_passkey_with_the_model_tokenizer(bpe):
  from pipelines.tasks import get

  _, tok = bpe
  src = get("passkey", length=128, depth=0.5, tokenizer=tok)
  byte_src = get("passkey", length=128, depth=0.5)
  for i in range(4):
    ex = src[i]
    assert ex["inputs"].shape == (128,) and ex["inputs"].max() < tok.vocab_size
    keep = ex["segment_ids"] > 0
    text = tok.decode(ex["inputs"][keep])
    answer = tok.decode(ex["targets"][ex["answer_spans"] > 0]).strip()
    assert len(answer) == 5 and answer.isdigit()
    assert f"The pass key is {answer}. Remember it." in text
    assert ex["inputs"][0] == tok.bos_id
    # Subword tokens hold several characters each: more text in the same 128 tokens.
    byte_chars = len(ByteTokenizer().decode(byte_src[i]["inputs"]))
    assert len(text) > 1.5 * byte_chars


def test_symbol_tasks_draw_from_the_model_vocabulary(bpe):
  from pipelines.tasks import get

  _, tok = bpe
  special = tok.special_ids()
  assert special == {0, 1, 2}
  ex = get("mqar", length=64, num_pairs=8, token_range=(0, 64), tokenizer=tok)[0]
  pairs = ex["inputs"][1:17]
  assert not set(pairs.tolist()) & special and pairs.max() < VOCAB
  assert ex["inputs"][0] == tok.bos_id
  # Byte-level ranges index the byte ids directly; here (0, 64) skips the three specials.
  assert pairs.min() >= 3
  ex = get("selective_copy", length=64, num_tokens=8, tokenizer=tok)[0]
  assert not set(ex["targets"][ex["answer_spans"] > 0].tolist()) & special


def test_loader_packs_with_the_tokenizer_and_counts_bytes(bpe, tmp_path):
  ref, tok = bpe
  doc = tmp_path / "a.txt"
  doc.write_text("memory models remember the pass key for a long time.\n" * 30)
  cfg = config_lib.DataConfig(
    source="text", paths=(str(doc), str(doc)), seq_len=16, tokenizer="unused"
  )
  with pytest.raises(ValueError, match="pass the run's tokenizer"):
    loader.build(cfg, vocab_size=VOCAB)
  data = loader.build(cfg, vocab_size=VOCAB, tokenizer=tok)
  body = ref.encode(doc.read_text(), add_special_tokens=False).ids
  want = [tok.bos_id, *body, tok.eos_id]
  assert data.train.tokens[: len(want)].tolist() == want
  # Bytes per token add up to the text's UTF-8 length, so bits per byte compares models.
  assert tok.token_bytes()[body].sum() == len(doc.read_bytes())
  assert tok.token_bytes()[[tok.bos_id, tok.eos_id]].sum() == 0


def test_hf_export_carries_the_tokenizer(imported, tmp_path):
  hf_dir, run = imported
  assert cli_main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "x")]) == 0
  for name in ("tokenizer.json",):
    assert (tmp_path / "x" / name).read_bytes() == (hf_dir / name).read_bytes()


def test_every_task_builds_with_the_model_tokenizer(bpe):
  from pipelines.tasks import get, score

  ref, tok = bpe
  corpus = tok.encode(" ".join(["The grass is green. The sky is blue.\nHere we go."] * 60))
  cases = [
    ("passkey", {}),
    ("needle_multi_value", {"corpus": corpus, "num_needles": 2}),
    ("mqar", {"num_pairs": 4, "token_range": (0, 64)}),
    ("set_disjointness", {"small_size": 3}),
    ("sequence_order", {"corpus": corpus, "segment_length": 8}),
    ("fact_chain", {"hops": 2}),
    ("selective_copy", {"num_tokens": 4}),
  ]
  for name, params in cases:
    src = get(name, length=256, seed=0, tokenizer=tok, **params)
    for i in range(3):
      ex = src[i]
      assert ex["inputs"].shape == (256,), name
      assert 0 <= ex["inputs"].min() and ex["inputs"].max() < tok.vocab_size, name
      assert ex["answer_spans"].max() >= 1, name
      # The targets themselves score 1, a shifted guess does not: spans mark real answers.
      assert score(ex["targets"], ex) == 1.0, name
      assert score(np.roll(ex["targets"], 1), ex) < 1.0, name
