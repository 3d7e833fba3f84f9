"""Every family's run goes through ``memzoo extrapolate`` and ``memzoo eval --suite all`` with
their default variants and suites; inapplicable variants are refused before any compute."""

import json

import pytest

import zoo
from pipelines import cli
from pipelines import config as config_lib
from pipelines.evaluation import extrapolate
from pipelines.evaluation import suite as eval_suite
from pipelines.train.loop import train

# One recipe per family (emllm_tiny is the infllm family with events; duo, infllm, hmt run as
# their recipes define them). The fast set: attention, a recurrent memory, a neural memory.
RECIPES = {
  "transformer": "transformer_tiny",
  "streaming": "streaming_tiny",
  "duo": "duo_tiny",
  "infllm": "infllm_tiny",
  "landmark": "landmark_tiny",
  "hmt": "hmt_tiny",
  "based": "based_tiny",
  "deltanet": "deltanet_tiny",
  "gated_deltanet": "gated_deltanet_tiny",
  "mamba2": "mamba2_tiny",
  "mom": "mom_tiny",
  "jrt": "jrt_tiny",
  "titans": "titans_tiny",
  "atlas": "atlas_tiny",
  "hope": "hope_tiny",
}
FAST = ("transformer", "deltanet")  # titans (about two minutes) runs in the slow set
L = 16

TINY = [
  f"data.seq_len={L}",
  "data.batch_size=2",
  "data.max_documents=8",
  "mesh.data=1",
  "train.steps=2",
  "train.eval_every=0",
  "train.async_checkpoint=false",
  "train.progress=false",
  "eval.batches=1",
  "eval.sample_tokens=0",
]


def test_one_recipe_per_family():
  assert set(RECIPES) == set(zoo.list_models())


def test_applicable_variants():
  tf = zoo.config("transformer", "tiny")
  assert set(extrapolate.applicable_variants(tf)) == set(extrapolate.VARIANTS)
  assert extrapolate.select_variants(tf) == extrapolate.DEFAULT_VARIANTS
  # A recurrent memory has a `window` (for hybrid attention layers) but no RoPE and no cache
  # policy: only the model as trained applies.
  dn = zoo.config("deltanet", "tiny")
  assert extrapolate.applicable_variants(dn) == ("none",)
  assert extrapolate.select_variants(dn) == ("none",)
  # StreamingLLM's cache takes a window and sinks, but its positions are not a scalable RoPE.
  st = extrapolate.applicable_variants(zoo.config("streaming", "tiny"))
  assert "sinks_window" in st and "ntk" not in st
  with pytest.raises(ValueError, match="'ntk' does not apply to model 'deltanet'.*no RoPE"):
    extrapolate.select_variants(dn, ("none", "ntk"))
  with pytest.raises(ValueError, match="'window' does not apply.*no attention cache"):
    extrapolate.select_variants(dn, ("window",))
  with pytest.raises(ValueError, match="unknown variant 'magic'"):
    extrapolate.select_variants(tf, ("magic",))


def test_cli_refuses_an_inapplicable_variant_before_loading(tmp_path, capsys):
  # The run has a config but no checkpoint: a refusal must come from the config alone.
  exp = config_lib.load("deltanet_tiny", [f"run_dir={tmp_path}"])
  config_lib.dump(exp, tmp_path / "config.yaml")
  assert cli.main(["extrapolate", str(tmp_path), "--variants", "none,yarn"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "'yarn' does not apply to model 'deltanet'" in err[0], err
  assert not (tmp_path / "extrapolation.json").exists()
  # Without --variants the same run gets past the check and fails only for want of weights.
  assert cli.main(["extrapolate", str(tmp_path)]) == 2
  assert "has no checkpoint" in capsys.readouterr().err


def _run_family(family, tmp_path):
  run_dir = tmp_path / family
  exp = config_lib.load(RECIPES[family], [f"run_dir={run_dir}", *TINY])
  train(exp)
  res = extrapolate.run(
    run_dir,
    factors=(1, 2),
    windows=1,
    depths=(0.5,),
    passkey_factors=(2,),
    passkey_examples=1,
  )
  assert tuple(res["variants"]) == extrapolate.select_variants(exp.model)
  for v in res["variants"].values():
    assert set(v["perplexity"]) == {str(L), str(2 * L)}
  saved = json.loads((run_dir / "extrapolation.json").read_text())
  assert saved["state_floats"] == res["state_floats"]
  out = eval_suite.run(run_dir, "all", n=1, batches=1)
  assert set(out) == {"heldout", "synthetic"}
  assert {r["task"] for r in out["synthetic"]} == {n for n, _ in eval_suite.task_specs(L, None)}
  return res


@pytest.mark.parametrize("family", FAST)
def test_extrapolate_and_eval_defaults(family, tmp_path):
  res = _run_family(family, tmp_path)
  s = res["state_floats"]
  if family == "deltanet":  # a recurrent memory: the state does not grow with length
    assert s[str(L)] == s[str(2 * L)]
  if family == "transformer":  # a KV cache does
    assert s[str(2 * L)] > s[str(L)]


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in RECIPES if f not in FAST])
def test_extrapolate_and_eval_defaults_every_family(family, tmp_path):
  _run_family(family, tmp_path)
