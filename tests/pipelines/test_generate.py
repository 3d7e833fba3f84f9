"""``memzoo generate``: greedy text equals ``transformers`` ``generate(do_sample=False)`` on a
tiny Llama saved with ``save_pretrained`` and a BPE ``tokenizer.json`` built here, imported
with ``memzoo import-hf``; the training-free memories run on the same weights."""

import pytest

from pipelines.cli import main as cli_main
from tests.pipelines.tiny_hf import TEXTS, VOCAB, bpe_tokenizer, hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tk = pytest.importorskip("tokenizers")

PROMPT = "The memory models remember"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("gen")
  model = hf_model(tmp / "hf")
  tok = bpe_tokenizer(tmp / "hf")
  assert cli_main(["import-hf", str(tmp / "hf"), "--run", str(tmp / "run")]) == 0
  return model, tok, tmp / "run"


def memzoo_generate(capsys, run, *args):
  capsys.readouterr()
  assert cli_main(["generate", str(run), *args]) == 0
  return capsys.readouterr().out[:-1]  # print's newline


def test_greedy_text_equals_transformers(imported, capsys):
  model, tok, run = imported
  ids = tok.encode(PROMPT).ids
  assert ids[0] == tok.token_to_id("<s>") and len(ids) < len(PROMPT)  # BOS + real merges
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=2)
  ref = out[0, len(ids) :].tolist()
  want = tok.decode(ref, skip_special_tokens=True)
  got = memzoo_generate(capsys, run, "--prompt", PROMPT, "--max-new-tokens", "24")
  assert got == want and len(ref) >= 8


@pytest.mark.slow
def test_streaming_inside_its_window_equals_plain_and_runs_past_max_len(imported, capsys):
  _, tok, run = imported
  plain = memzoo_generate(capsys, run, "--prompt", PROMPT, "--max-new-tokens", "20")
  # 4 sinks + 60 recent tokens cover the whole 26-token context: the same text.
  streamed = memzoo_generate(
    capsys, run, "--prompt", PROMPT, "--max-new-tokens", "20", "--method", "streaming"
  )
  assert streamed == plain
  long_prompt = " ".join(TEXTS * 4)
  n = len(tok.encode(long_prompt).ids)
  assert n + 16 > 64  # past the model's 64 positions
  assert cli_main(["generate", str(run), "--prompt", long_prompt, "--max-new-tokens", "16"]) == 2
  assert "exceeds max_len=64" in capsys.readouterr().err
  from pipelines.evaluation.generate import generate_text

  out = generate_text(run, long_prompt, 16, method="streaming")
  assert 1 <= len(out["ids"]) <= 16 and max(out["ids"]) < VOCAB
  assert out["prompt_ids"] == tok.encode(long_prompt).ids


@pytest.mark.slow
@pytest.mark.parametrize("method", ["infllm", "emllm", "duo"])
def test_memories_generate_past_max_len(imported, method):
  from pipelines.evaluation.generate import generate_text

  _, tok, run = imported
  long_prompt = " ".join(TEXTS * 4)
  out = generate_text(run, long_prompt, 12, method=method)
  assert len(tok.encode(long_prompt).ids) + 12 > 64
  assert 1 <= len(out["ids"]) <= 12 and max(out["ids"]) < VOCAB
  assert out["text"] == tok.decode(out["ids"], skip_special_tokens=True)
  if method == "duo":
    assert len(out["options"]["retrieval_heads"]) == 2  # one tuple per layer


def test_generate_refuses_bad_input(imported, tmp_path, capsys):
  _, _, run = imported
  assert cli_main(["generate", str(tmp_path), "--prompt", "x"]) == 2
  assert "not a run directory" in capsys.readouterr().err
  args = ["generate", str(run), "--prompt", "x", "--max-new-tokens", "0"]
  assert cli_main(args) == 2
  assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli_main(["generate", str(run), "--prompt", "x", "--method", "bogus"])
