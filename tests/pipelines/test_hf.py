"""Hugging Face interchange: export loads in transformers with matching logits; import of an
HF directory gives back the same parameters and a run that ``load_run`` accepts; unknown
architectures, mismatched shapes and corrupt files are refused."""

import json

import jax
import numpy as np
import pytest

import zoo
from pipelines import hf
from pipelines.cli import main as cli_main
from pipelines.export import CorruptFileError, flat_params
from pipelines.train import load_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 on both sides; differences come from summation order only (PyTorch vs XLA matmuls).
TOL = {"logits": 2e-4, "params": 0.0}

SMALL = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64)


def hf_llama(tmp_path, name="hf", **overrides):
  """A random HF Llama saved with ``save_pretrained`` (nothing downloaded)."""
  torch.manual_seed(0)
  fields = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
  )
  cfg = transformers.LlamaConfig(**{**fields, **overrides})
  model = transformers.LlamaForCausalLM(cfg).eval()
  # Norm weights start at 1 and biases at 0; randomise them so a swap or a drop would show.
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n or n.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path / name, safe_serialization=True)
  return model, tmp_path / name


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.array(tokens), dtype=torch.long)).logits.numpy()


def tokens(seed=0, shape=(2, 16), vocab=300):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_with_same_logits(tmp_path, tie):
  model = zoo.build(zoo.config("transformer", "tiny", tie_embeddings=tie, **SMALL), rngs=1)
  out = hf.export_hf(model, tmp_path / "export")
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
  x = tokens()
  ours = np.asarray(model(x)[0])
  np.testing.assert_allclose(torch_logits(loaded, x), ours, atol=TOL["logits"], rtol=TOL["logits"])


def test_hf_directory_imports_to_same_logits_and_back(tmp_path):
  ref, directory = hf_llama(tmp_path)
  cfg, model = hf.load_hf(directory)
  x = tokens(1)
  np.testing.assert_allclose(
    np.asarray(model(x)[0]), torch_logits(ref, x), atol=TOL["logits"], rtol=TOL["logits"]
  )
  # memzoo -> HF -> memzoo gives back the same parameters, bit for bit.
  hf.export_hf(model, tmp_path / "again")
  _, model2 = hf.load_hf(tmp_path / "again")
  a, b = flat_params(model), flat_params(model2)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_import_hf_writes_a_run_load_run_accepts(tmp_path, capsys):
  ref, directory = hf_llama(tmp_path, tie_word_embeddings=True)
  write_tokenizer(directory)
  run = tmp_path / "run"
  assert cli_main(["import-hf", str(directory), "--run", str(run)]) == 0
  assert (run / "tokenizer.json").is_file() and (run / "config.yaml").is_file()
  exp, model, step = load_run(run)
  assert step == 0 and exp.model.tie_embeddings and exp.model.vocab_size == 300
  x = tokens(2)
  np.testing.assert_allclose(
    np.asarray(model(x)[0]), torch_logits(ref, x), atol=TOL["logits"], rtol=TOL["logits"]
  )
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    hf.import_hf(directory, run)
  # The CLI says so in one line naming the run (exit code 2) and rewrites nothing.
  before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
  capsys.readouterr()
  assert cli_main(["import-hf", str(directory), "--run", str(run)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(run) in err[0] and "already holds a checkpoint" in err[0], err
  assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
  "field, match", [({"window": 8}, "sliding window"), ({"conv_width": 3}, "convolutions")]
)
def test_export_refuses_what_llama_cannot_express(tmp_path, field, match):
  model = zoo.build(zoo.config("transformer", "tiny", **SMALL, **field), rngs=0)
  with pytest.raises(hf.UnsupportedModelError, match=match):
    hf.export_hf(model, tmp_path / "export")
  assert not (tmp_path / "export").exists()


def test_unknown_architecture_is_refused(tmp_path, capsys):
  _, directory = hf_llama(tmp_path)
  cfg = json.loads((directory / "config.json").read_text())
  cfg["architectures"] = ["GPT2LMHeadModel"]
  (directory / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.UnsupportedModelError, match="GPT2LMHeadModel.*not supported"):
    hf.import_hf(directory, tmp_path / "run")
  assert cli_main(["import-hf", str(directory), "--run", str(tmp_path / "run")]) == 2
  assert "GPT2LMHeadModel" in capsys.readouterr().err
  assert not (tmp_path / "run" / "config.yaml").exists()


def test_mismatched_shapes_are_refused(tmp_path):
  _, directory = hf_llama(tmp_path)
  cfg = json.loads((directory / "config.json").read_text())
  cfg["intermediate_size"] = 48
  (directory / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CorruptFileError, match=r"gate_proj.weight.*shape \(64, 32\).*\(48, 32\)"):
    hf.load_hf(directory)


def test_truncated_safetensors_is_refused(tmp_path):
  _, directory = hf_llama(tmp_path)
  path = directory / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(CorruptFileError, match="truncated"):
    hf.import_hf(directory, tmp_path / "run")


def test_nonzero_attention_bias_is_refused(tmp_path):
  _, directory = hf_llama(tmp_path, attention_bias=True)
  cfg = json.loads((directory / "config.json").read_text())
  cfg["architectures"] = ["Qwen2ForCausalLM"]
  (directory / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.UnsupportedModelError, match="bias is non-zero"):
    hf.load_hf(directory)


def write_tokenizer(directory):
  """A small BPE ``tokenizer.json`` trained locally, with <s> and </s> specials."""
  tk = pytest.importorskip("tokenizers")
  tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(["def main():\n    return 0\n", "memory models remember"] * 20, trainer)
  tok.save(str(directory / "tokenizer.json"))


def test_imported_run_tokenizer_round_trips(tmp_path):
  from pipelines import tokenizers

  _, directory = hf_llama(tmp_path)
  write_tokenizer(directory)
  run = hf.import_hf(directory, tmp_path / "run")
  tok = tokenizers.load(run)
  text = "def remember():\n    return 'memory'"
  ids = tok.encode(text, bos=True, eos=True)
  assert ids.dtype == np.int32 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.bos_id != tok.eos_id and ids.max() < tok.vocab_size <= 300
  assert len(ids) < len(text)  # merges were learned, so it is not one token per byte
  assert tok.decode(ids) == text
  assert tok.bytes_per_token(ids[1:-1]) > 1.0


def test_truncated_checkpoint_of_imported_run_is_refused(tmp_path):
  _, directory = hf_llama(tmp_path)
  run = hf.import_hf(directory, tmp_path / "run")
  chunks = [p for p in (run / "checkpoints").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert chunks
  for p in chunks:  # cut every tensor chunk in half; the metadata stays intact
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  with pytest.raises(FileNotFoundError, match="no restorable checkpoint.*step 0"):
    load_run(run)


@pytest.mark.slow
def test_imported_run_is_accepted_by_eval(tmp_path):
  from pipelines import eval_suite

  _, directory = hf_llama(tmp_path)
  data = {"max_documents": 20, "seq_len": 16, "batch_size": 2}
  run = hf.import_hf(directory, tmp_path / "run", data=data)
  out = eval_suite.run(run, "heldout", batches=1)["heldout"]
  # A random 300-token model is near uniform: its loss sits close to ln(300) nats.
  assert out["step"] == 0 and abs(out["heldout_loss"] - np.log(300)) < 0.5


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(HF reference, transformer of the imported run): ``memzoo import-hf`` then ``load_run``."""
  tmp = tmp_path_factory.mktemp("imported")
  ref, directory = hf_llama(tmp)
  assert cli_main(["import-hf", str(directory), "--run", str(tmp / "run")]) == 0
  _, model, _ = load_run(tmp / "run")
  return ref, model


# Each method wraps the imported transformer with no training. ``fits``: options under which the
# whole test context (16 tokens) is inside the method's window/cache, so its logits must equal
# the plain transformer's; ``evicts``: options under which it is not, so they must differ (the
# method is really in the path).
METHODS = {
  "streaming": (
    "zoo.streaming",
    {"sinks": 4, "window": 16},
    {"sinks": 2, "window": 4},
  ),
  "infllm": (
    "zoo.infllm",
    {"sinks": 4, "window": 16, "block_size": 4, "top_k": 1, "n_repr": 2, "chunk_size": 8},
    {"sinks": 2, "window": 4, "block_size": 4, "top_k": 1, "n_repr": 2, "chunk_size": 4},
  ),
  "duo": (
    "zoo.duo",
    {"sinks": 4, "window": 16, "retrieval_heads": ((0,), (1,))},
    {"sinks": 2, "window": 4, "retrieval_heads": ((0,), (1,))},
  ),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_training_free_memory_methods_accept_an_imported_run(imported, method):
  import importlib

  ref, model = imported
  module, fits, evicts = METHODS[method]
  x = tokens(3)
  plain = np.asarray(model(x)[0])
  np.testing.assert_allclose(plain, torch_logits(ref, x), atol=TOL["logits"], rtol=TOL["logits"])
  wrap = importlib.import_module(module).from_transformer
  # Same float32 math in a different order (chunked prefill, per-head masks): same tolerance.
  np.testing.assert_allclose(
    np.asarray(wrap(model, **fits)(x)[0]), plain, atol=TOL["logits"], rtol=TOL["logits"]
  )
  small = np.asarray(wrap(model, **evicts)(x)[0])
  # Positions inside the small window still match; later ones see fewer keys and move.
  np.testing.assert_allclose(small[:, :4], plain[:, :4], atol=TOL["logits"], rtol=TOL["logits"])
  assert np.abs(small[:, 8:] - plain[:, 8:]).max() > 100 * TOL["logits"]


@pytest.mark.slow
def test_extrapolate_accepts_an_imported_run(tmp_path):
  import json as json_lib

  _, directory = hf_llama(tmp_path)
  data = {"max_documents": 20, "seq_len": 16, "batch_size": 2}
  run = hf.import_hf(directory, tmp_path / "run", data=data)
  args = ["--factors", "1,2", "--variants", "none,sinks_window", "--windows", "1"]
  assert cli_main(["extrapolate", str(run), *args, "--passkey-examples", "1"]) == 0
  saved = json_lib.loads((run / "extrapolation.json").read_text())
  assert saved["step"] == 0 and saved["lengths"] == [16, 32]
  for name in ("none", "sinks_window"):
    for n in ("16", "32"):
      # A random 300-token model: loss near ln(300) at every length.
      assert abs(saved["variants"][name]["perplexity"][n]["mean_loss"] - np.log(300)) < 0.5
