"""``memzoo generate``: greedy text equals ``transformers`` ``generate(do_sample=False)`` on a
tiny Llama saved with ``save_pretrained`` and a BPE ``tokenizer.json`` built here, imported
with ``memzoo import-hf``; the training-free memories run on the same weights."""

import pytest

from pipelines.cli import main as cli_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tk = pytest.importorskip("tokenizers")

VOCAB = 320
TEXTS = [
  "memory models remember the pass key for a long time.",
  "def main():\n    return remember(memory)\n",
  "The grass is green. The sky is blue. The sun is yellow.",
]
PROMPT = "The memory models remember"


def bpe_tokenizer(path):
  """A byte-level BPE trained on a few sentences, with Llama's ``<s>`` prefix on prompts."""
  tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(
    vocab_size=VOCAB,
    special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(TEXTS * 20, trainer)
  tok.post_processor = tk.processors.TemplateProcessing(
    single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
  )
  tok.save(str(path / "tokenizer.json"))
  return tok


def hf_model(path, max_len=64):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=max_len,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
  )
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # sharper logits than the default init: fewer near-ties in argmax
    for p in model.parameters():
      p.mul_(3.0)
  model.save_pretrained(path, safe_serialization=True)
  return model


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
    ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=2)[
      0, len(ids) :
    ].tolist()
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
  from pipelines.generate import generate_text

  out = generate_text(run, long_prompt, 16, method="streaming")
  assert 1 <= len(out["ids"]) <= 16 and max(out["ids"]) < VOCAB
  assert out["prompt_ids"] == tok.encode(long_prompt).ids


@pytest.mark.slow
@pytest.mark.parametrize("method", ["infllm", "emllm", "duo"])
def test_memories_generate_past_max_len(imported, method):
  from pipelines.generate import generate_text

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
