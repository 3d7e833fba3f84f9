"""Hugging Face interchange: export loads in transformers with matching logits; import of an
HF directory gives back the same parameters and a run that ``load_run`` accepts; unknown
architectures, mismatched shapes and corrupt files are refused."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import zoo
from pipelines.cli import main as cli_main
from pipelines.errors import CorruptFileError
from pipelines.interchange import hf
from pipelines.interchange.safetensors_io import flat_params
from pipelines.run import load_run

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
  "field, match",
  [
    ({"window": 8, "sinks": 2}, "sinks"),
    ({"conv_width": 3}, "convolutions"),
    ({"qk_norm": True, "qkv_bias": True}, "all of q, k, v, o or none"),
    ({"window": 8, "qkv_bias": True, "out_bias": True}, "no bias on the output projection"),
  ],
)
def test_export_refuses_what_transformers_cannot_express(tmp_path, field, match):
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


def test_tensor_without_a_place_is_refused(tmp_path):
  # Llama's attention_bias also biases o_proj, which Qwen2 does not have: relabelled as Qwen2,
  # the o_proj bias would be dropped, so the import names it and stops.
  _, directory = hf_llama(tmp_path, attention_bias=True)
  cfg = json.loads((directory / "config.json").read_text())
  cfg["architectures"] = ["Qwen2ForCausalLM"]
  del cfg["attention_bias"], cfg["mlp_bias"]
  (directory / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.UnsupportedModelError, match=r"o_proj.bias.*has no place"):
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
  from pipelines.data import hf_tokenizer as tokenizers

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
  from pipelines.evaluation import suite as eval_suite

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
    # Per-token retrieval (query_tile=1, the decode form): the eviction this case checks.
    {
      "sinks": 2,
      "window": 4,
      "block_size": 4,
      "top_k": 1,
      "n_repr": 2,
      "chunk_size": 4,
      "query_tile": 1,
    },
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


# ---------------------------------------------------------------------------------------------
# Every family, RoPE type and attention feature against transformers itself.

ARCH = {
  "llama": ("LlamaConfig", "LlamaForCausalLM"),
  "mistral": ("MistralConfig", "MistralForCausalLM"),
  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
  "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
BASE = dict(
  vocab_size=300,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  max_position_embeddings=64,
  rms_norm_eps=1e-6,
  tie_word_embeddings=False,
  # Larger than the default 0.02 so that logits are O(1): a feature that moves them moves
  # them far beyond the comparison tolerance.
  initializer_range=0.2,
)
LOGITS_TOL = 1e-3  # the bound for float32 on both sides
PROMPT, NEW = 8, 24


def save_hf(tmp_path, family, name="hf", layout="new", **fields):
  """A random ``transformers`` model of ``family`` saved with ``save_pretrained``.

  ``layout="old"`` rewrites config.json to the pre-5 layout: top-level ``rope_theta`` and
  ``rope_scaling`` instead of ``rope_parameters``.
  """
  torch.manual_seed(0)
  cfg_cls, model_cls = (getattr(transformers, n) for n in ARCH[family])
  model = model_cls(cfg_cls(**{**BASE, **fields})).eval()
  with torch.no_grad():  # norm weights start at 1 and biases at 0: randomise them
    for n, p in model.named_parameters():
      if "norm" in n or n.endswith("bias"):
        p.add_(0.3 * torch.randn_like(p))
  model.generation_config.eos_token_id = None
  model.save_pretrained(tmp_path / name, safe_serialization=True)
  path = tmp_path / name / "config.json"
  if layout == "old":
    cfg = json.loads(path.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    path.write_text(json.dumps(cfg))
  return model, tmp_path / name


def reload_hf(directory, edit=None):
  """``transformers`` model of ``directory`` after ``edit(config dict)`` (a variant)."""
  cfg = json.loads((directory / "config.json").read_text())
  if edit is not None:
    edit(cfg)
  (directory / "config.json").write_text(json.dumps(cfg))
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  model.generation_config.eos_token_id = None
  return model.eval()


def greedy_ours(model, prompt, n):
  """Greedy decode with the KV cache: prefill ``prompt [B,P]`` as one chunk, then n tokens."""
  from flax import nnx

  step = nnx.jit(lambda m, t, s: m.step(t, s))
  state = model.init_state(prompt.shape[0], prompt.shape[1] + n)
  logits, state = step(model, jnp.asarray(prompt, jnp.int32), state)
  out = []
  for _ in range(n):
    tok = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
    out.append(np.asarray(tok))
    logits, state = step(model, tok, state)
  return np.concatenate(out, axis=1)


def greedy_hf(model, prompt, n):
  with torch.no_grad():
    out = model.generate(
      torch.tensor(np.asarray(prompt), dtype=torch.long),
      max_new_tokens=n,
      min_new_tokens=n,
      do_sample=False,
      pad_token_id=0,
    )
  return out[:, prompt.shape[1] :].numpy()


def drop_rope(cfg):
  """The same checkpoint with plain RoPE (in whichever layout it was written)."""
  if cfg.get("rope_parameters"):
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
  cfg["rope_scaling"] = None
  cfg["rope_theta"] = 10000.0


def no_window(cfg):
  cfg["sliding_window"] = None
  cfg.pop("layer_types", None)
  cfg["use_sliding_window"] = False


def zero_biases(model):
  with torch.no_grad():
    for n, p in model.named_parameters():
      if n.endswith("bias"):
        p.zero_()
  return model


def no_qk_norm(model):
  for layer in model.model.layers:
    layer.self_attn.q_norm = torch.nn.Identity()
    layer.self_attn.k_norm = torch.nn.Identity()
  return model


YARN = {
  "rope_type": "yarn",
  "factor": 4.0,
  "original_max_position_embeddings": 16,
  "beta_fast": 16.0,
  "beta_slow": 2.0,
  "mscale": 1.2,
  "mscale_all_dim": 0.8,
  "truncate": False,
}
LLAMA3 = {
  "rope_type": "llama3",
  "factor": 8.0,
  "original_max_position_embeddings": 16,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
}
LONGROPE = {
  "rope_type": "longrope",
  "original_max_position_embeddings": 16,
  "short_factor": [1.0, 1.3, 1.9, 2.5],
  "long_factor": [1.2, 2.0, 4.0, 7.0],
  "factor": 4.0,
}

# name: (family, layout, config fields, how to turn the feature off: ("config", edit) on the
# saved config.json or ("model", fn) on the loaded reference). Sequences of PROMPT + NEW = 32
# tokens run past every original length here (16), so the length-dependent types switch.
CASES = {
  "llama-theta-new": (
    "llama",
    "new",
    dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    ("config", drop_rope),
  ),
  "llama-theta-old": (
    "llama",
    "old",
    dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    ("config", drop_rope),
  ),
  "llama-linear-old": (
    "llama",
    "old",
    dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    ("config", drop_rope),
  ),
  "llama-linear-new": (
    "llama",
    "new",
    dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    ("config", drop_rope),
  ),
  "llama-dynamic": (
    "llama",
    "new",
    dict(
      max_position_embeddings=16,
      rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 100.0},
    ),
    ("config", drop_rope),
  ),
  "llama-yarn": (
    "llama",
    "new",
    dict(rope_parameters={**YARN, "rope_theta": 10000.0}),
    ("config", drop_rope),
  ),
  "llama-yarn-old": (
    "llama",
    "old",
    dict(rope_parameters={**YARN, "rope_theta": 10000.0}),
    ("config", drop_rope),
  ),
  "llama3": (
    "llama",
    "new",
    dict(rope_parameters={**LLAMA3, "rope_theta": 10000.0}),
    ("config", drop_rope),
  ),
  "llama-longrope": (
    "llama",
    "new",
    dict(rope_parameters={**LONGROPE, "rope_theta": 100.0}),
    ("config", drop_rope),
  ),
  "llama-bias-tied": (
    "llama",
    "new",
    dict(attention_bias=True, tie_word_embeddings=True),
    ("model", zero_biases),
  ),
  "mistral-window": ("mistral", "new", dict(sliding_window=5), ("config", no_window)),
  "qwen2-bias-layer-windows": (
    "qwen2",
    "new",
    dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ("config", no_window),
  ),
  "qwen2-biases-mha": ("qwen2", "old", dict(num_key_value_heads=4), ("model", zero_biases)),
  "qwen3-qk-norm": ("qwen3", "new", dict(), ("model", no_qk_norm)),
  "qwen3-norm-bias-yarn-windows": (
    "qwen3",
    "new",
    dict(
      attention_bias=True,
      use_sliding_window=True,
      sliding_window=5,
      max_window_layers=1,
      rope_parameters={**YARN, "rope_theta": 10000.0},
    ),
    ("config", no_window),
  ),
}
FAST = {"qwen2-bias-layer-windows", "qwen3-qk-norm"}  # the rest (RoPE types, layouts): slow


@pytest.mark.parametrize(
  "case",
  [pytest.param(c, marks=() if c in FAST else pytest.mark.slow) for c in CASES],
)
def test_import_matches_transformers(tmp_path, case):
  family, layout, fields, (where, off) = CASES[case]
  ref, directory = save_hf(tmp_path, family, layout=layout, **fields)
  x = np.asarray(tokens(4, (2, 32)))
  want = torch_logits(reload_hf(directory), x)
  # The feature matters: the same checkpoint without it gives other logits, so an import
  # that dropped it would fail below.
  variant = shutil.copytree(directory, tmp_path / "variant")
  if where == "config":
    other = reload_hf(variant, off)
  else:
    other = off(reload_hf(variant))
  assert np.abs(torch_logits(other, x) - want).max() > 50 * LOGITS_TOL
  cfg, model = hf.load_hf(directory)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))[0]), want, atol=LOGITS_TOL, rtol=0)
  prompt = x[:1, :PROMPT]
  np.testing.assert_array_equal(
    greedy_ours(model, prompt, NEW), greedy_hf(reload_hf(directory), prompt, NEW)
  )


def random_params(model, seed=0):
  """Every parameter random (biases and norm scales included), so each one shows in the logits."""
  from flax import nnx

  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(seed), len(flat))
  for key, (path, var) in zip(keys, flat):
    v = var[...]
    scale = (
      0.3
      if path[-1] in ("scale",) or "bias" in [str(p) for p in path] or path[-1] == "out_bias"
      else 0.2
    )
    base = 1.0 if path[-1] == "scale" else 0.0
    var[...] = base + scale * jax.random.normal(key, v.shape, v.dtype)
  return model


EXPORTS = {
  "llama-bias-llama3": dict(
    qkv_bias=True,
    out_bias=True,
    rope_scaling={"kind": "llama3", "factor": 8.0, "original_max_len": 16},
  ),
  "qwen2-layer-windows": dict(qkv_bias=True, window=5, window_layers=(1,)),
  "qwen2-window-no-bias": dict(window=5, tie_embeddings=True),
  "qwen3-norm-yarn": dict(
    qk_norm=True,
    rope_scaling={
      "kind": "yarn",
      "factor": 4.0,
      "original_max_len": 16,
      "beta_fast": 16.0,
      "mscale": 1.2,
      "mscale_all_dim": 0.8,
    },
  ),
  "qwen3-norm-bias-longrope": dict(
    qk_norm=True,
    qkv_bias=True,
    out_bias=True,
    rope_scaling={
      "kind": "longrope",
      "factor": 4.0,
      "original_max_len": 16,
      "short_factor": [1.0, 1.3, 1.9, 2.5],
      "long_factor": [1.2, 2.0, 4.0, 7.0],
    },
  ),
  "llama-dynamic": dict(
    rope_scaling={"kind": "dynamic_ntk", "factor": 4.0, "original_max_len": 16}
  ),
}
EXPORT_FAST = {"qwen2-layer-windows", "qwen3-norm-bias-longrope"}


@pytest.mark.parametrize(
  "case",
  [pytest.param(c, marks=() if c in EXPORT_FAST else pytest.mark.slow) for c in EXPORTS],
)
def test_export_reloads_in_transformers_with_equal_logits(tmp_path, case):
  fields = {**SMALL, "head_dim": 8, "max_len": 16 if "dynamic" in case else 64, **EXPORTS[case]}
  model = random_params(zoo.build(zoo.config("transformer", "tiny", **fields), rngs=1))
  out = hf.export_hf(model, tmp_path / "export")
  assert json.loads((out / "config.json").read_text())["architectures"] == [
    hf.export_target(model.config)
  ]
  loaded = reload_hf(out)
  x = tokens(5, (2, 32))
  np.testing.assert_allclose(
    torch_logits(loaded, x), np.asarray(model(x)[0]), atol=LOGITS_TOL, rtol=0
  )
  # And back: the export imports to the same parameters (Qwen2 always has q/k/v biases, so a
  # model without them comes back with zero ones).
  _, again = hf.load_hf(out)
  a, b = flat_params(model), flat_params(again)
  assert set(a) <= set(b)
  for k in b:
    np.testing.assert_array_equal(a[k] if k in a else 0 * b[k], b[k], err_msg=k)
  assert all(".attn.bias." in k for k in set(b) - set(a))


# ---------------------------------------------------------------------------------------------
# Refusals: the key and its value named, exit 2, nothing written.


def _set(key, value):
  return lambda cfg: cfg.__setitem__(key, value)


def _rope(**entries):
  def edit(cfg):
    cfg["rope_parameters"] = {**cfg["rope_parameters"], **entries}

  return edit


REFUSALS = {
  "unknown key": (_set("use_magic_attention", True), r"'use_magic_attention' \(= True\)"),
  "rope type": (_rope(rope_type="proportional", factor=2.0), r"rope_type='proportional'"),
  "rope key": (_rope(rope_type="linear", factor=2.0, beta_fast=3), r"'beta_fast' \(= 3\)"),
  "partial rotary": (_set("partial_rotary_factor", 0.5), r"partial_rotary_factor=0.5"),
  "activation": (_set("hidden_act", "gelu"), r"hidden_act='gelu'"),
  "per-layer rope": (
    _set("rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "per-layer-type RoPE",
  ),
  "mistral layer types": (_set("layer_types", ["full_attention"] * 2), r"'layer_types'"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """One saved checkpoint per family for the refusal tests (they only read config.json)."""
  tmp = tmp_path_factory.mktemp("saved")
  return {f: save_hf(tmp, f, name=f)[1] for f in ("llama", "mistral")}


@pytest.mark.parametrize("what", list(REFUSALS))
def test_unsupported_config_is_refused_with_nothing_written(tmp_path, capsys, saved, what):
  edit, match = REFUSALS[what]
  family = "mistral" if what.startswith("mistral") else "llama"
  directory = shutil.copytree(saved[family], tmp_path / "hf")
  cfg = json.loads((directory / "config.json").read_text())
  edit(cfg)
  (directory / "config.json").write_text(json.dumps(cfg))
  run = tmp_path / "run"
  capsys.readouterr()
  assert cli_main(["import-hf", str(directory), str(run)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and re.search(match, err[0]), err
  assert not run.exists()


# ---------------------------------------------------------------------------------------------
# Import that scales: stored dtype, mesh placement, no optimizer state, overrides, training.


def test_bfloat16_import_keeps_dtype_places_on_mesh_and_writes_no_optimizer(tmp_path):
  from flax import nnx

  from pipelines import sharding
  from pipelines.run import build_model
  from pipelines.train.checkpoint import Checkpointer

  ref, directory = save_hf(tmp_path, "qwen2", name="bf16")
  ref.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
  run = tmp_path / "run"
  args = ["data.seq_len=24", "mesh.data=1", "mesh.fsdp=2"]
  assert cli_main(["import-hf", str(directory), str(run), *args]) == 0
  exp, model, step = load_run(run)
  assert exp.data.seq_len == 24 and exp.mesh.fsdp == 2 and step == 0
  assert exp.model.param_dtype == "bfloat16" and exp.model.qkv_bias
  # The stored bfloat16 values, bit for bit (no float32 round trip could change them, but a
  # float32 checkpoint would double the bytes): compare with the file's tensors.
  _, tensors = hf.read_hf(directory)
  w = flat_params(model)
  assert w["blocks.0.attn.wq"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    w["blocks.0.attn.wq"], tensors["model.layers.0.self_attn.q_proj.weight"].T.reshape(32, 4, 8)
  )
  np.testing.assert_array_equal(
    w["blocks.1.attn.bias.k"].ravel(), tensors["model.layers.1.self_attn.k_proj.bias"]
  )
  # Exported back, the tensors stay bfloat16, the bytes of the original file's (not widened
  # to float32, which would double the export), and the config says so.
  out = hf.export_hf(model, tmp_path / "bf16_export")
  _, again = hf.read_hf(out)
  for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.bias"):
    assert again[name].dtype == tensors[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(again[name], tensors[name])
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  # Step 0 holds the parameters only, stored in bfloat16.
  ckpt = Checkpointer(run, async_save=False)
  try:
    tree = ckpt.manager.item_metadata(0)["state"]
    assert not ckpt.has_optimizer(0)
  finally:
    ckpt.close()
  assert set(tree) == {"params"} and tree["params"]["embed"]["value"].dtype == jnp.bfloat16
  # On a mesh the import placed each parameter sharded by its logical axes (fsdp over embed).
  mesh = sharding.make_mesh(exp.mesh)
  _, abstract, _ = jax.eval_shape(lambda: build_model(exp))
  _, index = hf.open_hf(directory)
  params = hf.read_params(index, exp.model, abstract, sharding.param_shardings(abstract, mesh))
  embed = nnx.to_flat_state(params)
  wq = dict((".".join(map(str, p)), v[...]) for p, v in embed)["blocks.0.attn.wq"]
  assert len(wq.sharding.device_set) == 2 and wq.addressable_shards[0].data.shape[0] == 16


@pytest.mark.slow
def test_training_resumes_from_an_imported_run(tmp_path):
  from pipelines import config as config_lib
  from pipelines.train.loop import train

  _, directory = save_hf(tmp_path, "llama")
  run = tmp_path / "run"
  args = ["data.seq_len=16", "data.batch_size=2", "data.max_documents=20", "train.steps=2"]
  assert cli_main(["import-hf", str(directory), str(run), *args, "train.eval_every=0"]) == 0
  _, before, _ = load_run(run)
  result = train(config_lib.load(run / "config.yaml"))
  assert result.step == 2 and np.isfinite(result.history[-1]["loss"])
  exp, after, step = load_run(run)
  assert step == 2
  moved = [k for k, v in flat_params(after).items() if np.any(v != flat_params(before)[k])]
  assert "blocks.0.attn.wq" in moved


@pytest.mark.parametrize(
  "family, fields, drop",
  [
    ("mistral", dict(sliding_window=8), "sliding_window"),
    (
      "qwen2",
      dict(use_sliding_window=True, sliding_window=8, max_window_layers=20),
      "max_window_layers",
    ),
    (
      "qwen2",
      dict(use_sliding_window=True, sliding_window=8, max_window_layers=20),
      "sliding_window",
    ),
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=3), "layer_types"),
    ("llama", dict(), "max_position_embeddings"),
  ],
)
def test_omitted_keys_take_transformers_defaults(family, fields, drop):
  cfg_cls, arch = (getattr(transformers, n) for n in ARCH[family])
  written = json.loads(cfg_cls(**{**BASE, "num_hidden_layers": 30, **fields}).to_json_string())
  written["architectures"] = [arch.__name__]
  written.pop(drop, None)
  theirs = cfg_cls.from_dict(dict(written))
  section = hf.config_from_hf(written)
  section.pop("name")
  ours = zoo.config("transformer", "tiny", **section)
  types = getattr(theirs, "layer_types", None) or ["sliding_attention"] * 30
  window = getattr(theirs, "sliding_window", None)
  want = [window if t == "sliding_attention" else None for t in types]
  assert [ours.layer_window(i) for i in range(30)] == want
  assert ours.max_len == theirs.max_position_embeddings
