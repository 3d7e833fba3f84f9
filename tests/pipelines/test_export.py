"""Export: safetensors reload without Orbax, refusal of corrupt files, StableHLO artifacts of the
forward pass and the decode step that match the live model, and ``memzoo export``."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from pipelines import config as config_lib
from pipelines.cli import main as cli_main
from pipelines.interchange import export, safetensors_io
from pipelines.train.loop import train

# Same float32 program compiled twice (live jit vs deserialised artifact): tiny reorderings only.
TOL = {"logits": 1e-5}

RAW = {
  "model": {
    "preset": "tiny",
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 1,
    "d_ff": 64,
    "max_len": 32,
  },
  "data": {"source": "stdlib", "max_documents": 20, "seq_len": 16, "batch_size": 2},
  "mesh": {"data": 1},
  "train": {
    "steps": 2,
    "lr": 1e-2,
    "warmup_steps": 0,
    "eval_every": 0,
    "checkpoint_every": 2,
    "async_checkpoint": False,
    "progress": False,
  },
}


@pytest.fixture(scope="module")
def model_and_exp():
  exp = config_lib.from_dict({**RAW, "run_dir": "unused"})
  return exp, zoo.build(exp.model, rngs=3)


def tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, 260)


def test_safetensors_round_trip_without_orbax(tmp_path, model_and_exp):
  exp, model = model_and_exp
  export.save_safetensors(model, exp, tmp_path, step=7)
  exp2, model2, step = export.load_safetensors(tmp_path)
  assert step == 7 and exp2.model == exp.model
  a, b = safetensors_io.flat_params(model), safetensors_io.flat_params(model2)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_corrupt_safetensors_is_refused(tmp_path, model_and_exp):
  exp, model = model_and_exp
  export.save_safetensors(model, exp, tmp_path, step=0)
  path = tmp_path / "model.safetensors"
  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF  # one flipped byte inside a tensor: the header still parses
  path.write_bytes(bytes(data))
  with pytest.raises(export.CorruptFileError, match="SHA-256 does not match"):
    export.load_safetensors(tmp_path)
  path.write_bytes(bytes(data[: len(data) // 2]))
  with pytest.raises(export.CorruptFileError, match="truncated|SHA-256"):
    export.load_safetensors(tmp_path)
  # Without the checksum to catch it, the truncation itself is reported.
  meta = json.loads((tmp_path / "config.json").read_text())
  meta["sha256"] = safetensors_io.sha256(path)
  (tmp_path / "config.json").write_text(json.dumps(meta))
  with pytest.raises(export.CorruptFileError, match="SHA-256 does not match checksums.json"):
    export.load_safetensors(tmp_path)
  safetensors_io.write_checksums(tmp_path)
  with pytest.raises(export.CorruptFileError, match="truncated"):
    export.load_safetensors(tmp_path)


def test_stablehlo_forward_and_decode_match_live_model(tmp_path, model_and_exp):
  _, model = model_and_exp
  paths = export.export_stablehlo(model, tmp_path, batch=2, seq_len=8, max_len=16)
  weights = {k: jnp.asarray(v) for k, v in safetensors_io.flat_params(model).items()}
  fwd = export.load_stablehlo(paths["forward"])
  x = tokens(0, (2, 8))
  np.testing.assert_allclose(
    np.asarray(fwd.call(weights, x)),
    np.asarray(model(x)[0]),
    atol=TOL["logits"],
    rtol=TOL["logits"],
  )
  # Three decode steps from the saved empty state equal the live model's steps.
  dec = export.load_stablehlo(paths["decode_step"])
  saved = np.load(paths["decode_state"])
  live_state = model.init_state(2, 16)
  treedef = jax.tree.structure(live_state)
  state = jax.tree.unflatten(treedef, [jnp.asarray(saved[f"arr_{i}"]) for i in range(len(saved))])
  for t in range(3):
    tok = tokens(t + 1, (2, 1))
    got, state = dec.call(weights, tok, state)
    want, live_state = model.step(tok, live_state)
    np.testing.assert_allclose(
      np.asarray(got), np.asarray(want), atol=TOL["logits"], rtol=TOL["logits"]
    )


def test_cli_export_safetensors_of_a_trained_run(tmp_path):
  result = train(config_lib.from_dict({**RAW, "run_dir": str(tmp_path / "run")}))
  assert (
    cli_main(
      ["export", str(tmp_path / "run"), "--format", "safetensors", "--out", str(tmp_path / "st")]
    )
    == 0
  )
  _, model, step = export.load_safetensors(tmp_path / "st")
  assert step == 2
  from flax import nnx

  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(result.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
