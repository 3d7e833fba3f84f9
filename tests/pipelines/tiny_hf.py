"""Tiny Hugging Face models and tokenizers built locally for the tokenizer, generation and
memory-grid tests (nothing is downloaded)."""

import pytest

VOCAB = 512
TEXTS = [
  "memory models remember the pass key for a long time.",
  "The pass key is 12345. Remember it. 67890 is the pass key. What is the pass key?",
  "One of the special magic numbers for amber-badger is: 1234567.",
  "def main():\n    return remember(memory)\n",
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
]


def bpe_tokenizer(path, vocab=VOCAB, bos_prefix=True):
  """A byte-level BPE trained on ``TEXTS``, saved as ``path/tokenizer.json``; with
  ``bos_prefix`` its post-processor starts every prompt with ``<s>`` (as Llama's does)."""
  tk = pytest.importorskip("tokenizers")
  tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(
    vocab_size=vocab,
    special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(TEXTS * 20, trainer)
  if bos_prefix:
    tok.post_processor = tk.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  return tok


def llama_config(vocab=VOCAB, max_len=64, **overrides):
  transformers = pytest.importorskip("transformers")
  fields = dict(
    vocab_size=vocab,
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
  return transformers.LlamaConfig(**{**fields, **overrides})


def hf_model(path, scale=3.0, **overrides):
  """A random HF Llama saved with ``save_pretrained``; weights scaled by ``scale`` for sharper
  logits (fewer near-ties in greedy argmax between PyTorch and XLA)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(llama_config(**overrides)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.mul_(scale)
  model.save_pretrained(path, safe_serialization=True)
  return model
