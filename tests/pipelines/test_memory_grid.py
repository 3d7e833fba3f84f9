"""``memzoo eval RUN --suite memory`` on an imported model: passkey / needle grids for plain
attention, StreamingLLM, InfLLM, EM-LLM and Duo on the same weights, built with the model's
own tokenizer (ids in its vocabulary, lengths in tokens), with KV memory per method."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main as cli_main
from pipelines.data import hf_tokenizer as tokenizers
from pipelines.evaluation.suite import mean_chars
from pipelines.interchange import hf
from pipelines.tasks import get as get_task
from tests.pipelines.tiny_hf import VOCAB, bpe_tokenizer, hf_model

pytest.importorskip("transformers")

DATA = {"max_documents": 12}  # the needle haystacks: held-out stdlib text, BPE-tokenized


def test_memory_grid_runs_with_the_model_tokenizer(tmp_path, capsys):
  hf_model(tmp_path / "hf")  # 64 positions: the trained length L
  bpe_tokenizer(tmp_path / "hf")
  run = hf.import_hf(tmp_path / "hf", tmp_path / "run", data=DATA)
  args = ["--methods", "none,streaming", "--factors", "1,2", "--depths", "0.5"]
  assert cli_main(["eval", str(run), "--suite", "memory", *args, "--examples", "1"]) == 0
  res = json.loads((run / "memory.json").read_text())
  assert res["train_len"] == 64 and res["lengths"] == [64, 128]
  assert res["tokenizer"].endswith("tokenizer.json") and res["vocab_size"] < VOCAB
  tok = tokenizers.load_tokenizer(run)
  cells = {(c["method"], c["task"], c["length"]) for c in res["cells"]}
  # Passkey fits both lengths; the longer needle prompt only 2L.
  want = {(m, "passkey", n) for m in ("none", "streaming") for n in (64, 128)}
  assert want | {(m, "needle_single", 128) for m in ("none", "streaming")} == cells
  corpus = None
  for c in res["cells"]:
    params = {"corpus": corpus} if c["task"] == "needle_single" else {}
    if c["task"] == "needle_single" and corpus is None:
      from pipelines.evaluation.extrapolate import heldout_stream
      from pipelines.run import load_run

      corpus = heldout_stream(load_run(run)[0], tok)
      params = {"corpus": corpus}
    src = get_task(c["task"], length=c["length"], depth=0.5, seed=0, tokenizer=tok, **params)
    ex = src[0]
    # Lengths are tokens of the model's tokenizer, ids inside its vocabulary.
    assert ex["inputs"].shape == (c["length"],) and ex["inputs"].max() < tok.vocab_size
    assert c["chars"] == pytest.approx(mean_chars(src, tok)) and c["chars"] > 1.2 * c["length"]
  kv = {(m["method"], m["length"]): m["kv_bytes"] for m in res["memory"]}
  # A full cache grows by K and V of every layer and KV head for each of the 64 extra tokens
  # (2 layers x 2 KV heads x head dim 8, float32).
  assert kv["none", 128] - kv["none", 64] == 64 * 2 * (2 * 2 * 8) * 4
  assert kv["streaming", 128] == kv["streaming", 64] < kv["none", 64]  # sinks + window
  report = (run / "report.md").read_text()
  assert "## Training-free memories" in report and "memory.png" in report
  assert (run / "memory.png").stat().st_size > 1000


def train_imported_passkey_model(tmp: Path, steps: int = 600) -> Path:
  """A tiny Llama trained here on passkey retrieval at 64 tokens with a BPE tokenizer,
  exported to a Hugging Face directory (weights + tokenizer.json) and imported back as a run."""
  from flax import nnx

  import zoo
  from pipelines.tasks.training import Budget, train_on_task

  bpe_tokenizer(tmp / "tok")
  tok = tokenizers.load(tmp / "tok")
  cfg = zoo.config(
    "transformer", "tiny", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
    d_ff=128, max_len=64,
  )  # fmt: skip
  train = get_task("passkey", length=64, num_digits=4, seed=1, tokenizer=tok)
  heldout = get_task("passkey", length=64, num_digits=4, seed=2, tokenizer=tok)
  out = train_on_task(cfg, train, heldout, Budget(steps=steps, batch_size=32, lr=3e-3), seed=0)
  model = zoo.build(cfg, rngs=nnx.Rngs(0))
  nnx.update(model, out["params"])
  hf.export_hf(model, tmp / "hf")
  shutil.copy(tmp / "tok" / "tokenizer.json", tmp / "hf" / "tokenizer.json")
  run = hf.import_hf(tmp / "hf", tmp / "run", data=DATA)
  (run / "trained.json").write_text(json.dumps({k: out[k] for k in ("accuracy", "last_loss")}))
  return run


@pytest.mark.slow
def test_memory_report_on_an_imported_model_trained_to_retrieve(tmp_path):
  run = train_imported_passkey_model(tmp_path)
  trained = json.loads((run / "trained.json").read_text())
  assert trained["accuracy"] > 0.5  # it retrieves within its trained length
  # The model learned 4-digit passkeys only (no needle training): the grid asks the same.
  args = ["--factors", "1,2,4,8", "--depths", "0,0.5,1", "--tasks", "passkey", "--digits", "4"]
  assert cli_main(["eval", str(run), "--suite", "memory", *args, "--examples", "8"]) == 0
  res = json.loads((run / "memory.json").read_text())
  acc = {}
  for c in res["cells"]:
    acc.setdefault((c["method"], c["task"], c["length"]), []).append(c["accuracy"])
  acc = {k: float(np.mean(v)) for k, v in acc.items()}
  # Inside the trained length every method sees the needle: plain attention retrieves.
  assert acc["none", "passkey", 64] > 0.5
  # At 8x, StreamingLLM's window has dropped needles at depth 0 and 0.5: it cannot score all.
  assert acc["streaming", "passkey", 512] < 0.9
  kv = {(m["method"], m["length"]): m["kv_bytes"] for m in res["memory"]}
  assert kv["streaming", 512] < kv["none", 512]
  assert (run / "memory.png").is_file()


@pytest.mark.parametrize(
  "args, message",
  [
    (["--methods", "none,bogus"], "--methods 'none,bogus': choose from"),
    (["--tasks", "mqar"], "--tasks 'mqar': choose from"),
    (["--digits", "0"], "--digits must be >= 1"),
  ],
)
def test_memory_suite_refuses_bad_options(tmp_path, capsys, args, message):
  assert cli_main(["eval", str(tmp_path), "--suite", "memory", *args]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err
