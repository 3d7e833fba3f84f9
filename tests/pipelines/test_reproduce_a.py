"""``memzoo reproduce`` claims: StreamingLLM, RoPE scaling, Landmark attention, DuoAttention.

Fast tests run each claim at size ``tiny`` (plumbing: files, keys, shapes, finite numbers);
slow tests run size ``small`` and check the direction each claim was measured to have.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipelines import reproduce as rp
from pipelines.reproduce import core


def _run(name, tmp_path, size="tiny"):
  rec = rp.reproduce(name, rp.Settings(size=size, seed=0, out_dir=tmp_path, progress=False))
  saved = json.loads((tmp_path / name / "result.json").read_text())
  assert saved["claim"] == name and saved["size"] == size
  assert saved["verdict"].startswith(f"{name}: ") and isinstance(saved["holds"], bool)
  assert (tmp_path / name / f"{name}.png").stat().st_size > 5000
  return rec


def _finite(*values):
  return all(v is not None and math.isfinite(v) for v in values)


def test_claims_are_registered():
  names = core.claims()
  for name in ("streaming_llm", "rope_scaling", "landmark", "duo_attention"):
    assert name in names and names[name].minutes > 0


@pytest.mark.slow  # over 20 s on 2 cores (compiles several steps)
def test_streaming_llm_tiny(tmp_path):
  d = _run("streaming_llm", tmp_path)["data"]
  n = d["stream_len"]
  assert d["cache"] == d["train_len"] // 4 and n == 4 * d["train_len"]
  curves = {k: np.asarray(v) for k, v in d["position_loss"].items()}
  assert set(curves) == {"full", "window", "sinks_window"}
  assert all(c.shape == (n,) and np.isfinite(c).all() for c in curves.values())
  # Until the cache fills every variant sees the same keys at the same relative positions.
  c = d["cache"]
  np.testing.assert_allclose(curves["window"][:c], curves["full"][:c], atol=2e-3)
  np.testing.assert_allclose(curves["sinks_window"][:c], curves["full"][:c], atol=2e-3)
  # Past the cache the windowed caches forget: their losses differ from full attention's.
  assert np.abs(curves["window"][c:] - curves["full"][c:]).max() > 1e-3


@pytest.mark.slow  # over a minute on 2 cores: tiny still trains and finetunes a LM
def test_rope_scaling_tiny(tmp_path):
  d = _run("rope_scaling", tmp_path)["data"]
  assert d["lengths"] == [2 * d["train_len"], 4 * d["train_len"], 8 * d["train_len"]]
  for v in ("none", "linear", "ntk", "yarn"):
    for n in d["lengths"]:
      cell = d["zero_shot"][v][str(n)]
      assert _finite(cell["mean_loss"], cell["loss_beyond_train_len"])
    tuned = d["finetune"]["variants"][v]
    assert _finite(tuned["mean_loss"]) and len(tuned["train_loss"]) == d["finetune"]["steps"]
  # The scalings change the model: at 8L their losses differ from unscaled RoPE's.
  at = str(d["lengths"][-1])
  none = d["zero_shot"]["none"][at]["mean_loss"]
  assert all(abs(d["zero_shot"][v][at]["mean_loss"] - none) > 1e-4 for v in ("linear", "ntk"))
  assert d["best_after_finetune"] in ("none", "linear", "ntk", "yarn")


@pytest.mark.slow  # trains a passkey model and a landmark model
def test_landmark_tiny(tmp_path):
  d = _run("landmark", tmp_path)["data"]
  assert d["eval_len"] == 8 * d["train_len"]
  assert set(d["accuracy"]) == {"transformer", "landmark_dense", f"landmark_top{d['top_k']}"}
  for per_len in d["accuracy"].values():
    assert set(per_len) == {str(d["train_len"]), str(d["eval_len"])}
    assert all(_finite(a) for a in per_len.values())
  assert all(_finite(*pair) for pair in d["train_loss"].values())


def test_duo_attention_tiny(tmp_path):
  d = _run("duo_attention", tmp_path)["data"]
  L = d["train_len"]
  assert set(d["accuracy"]) == {"full", "duo", "duo_other_half", "all_streaming"}
  assert all(_finite(a) for a in d["accuracy"].values())
  # Half of the KV heads keep full attention; the other half of the KV heads is the complement.
  gates = np.asarray(d["gates"])
  assert sum(len(h) for h in d["retrieval_heads"]) == gates.size // 2
  kv = {k: v[str(L)] for k, v in d["kv_bytes"].items()}
  # Full > Duo (either half) > all streaming; the streaming heads' cache does not grow.
  assert kv["full"] > kv["duo"] == kv["duo_other_half"] > kv["all_streaming"]
  assert d["kv_bytes"]["all_streaming"][str(8 * L)] == kv["all_streaming"]
  assert d["kv_ratio"][str(8 * L)] < d["kv_ratio"][str(L)] < 1


@pytest.mark.slow
def test_streaming_llm_small(tmp_path):
  d = _run("streaming_llm", tmp_path, "small")["data"]
  past, past_l, base = d["loss_past_cache"], d["loss_past_train_len"], d["loss_before_cache_fills"]
  # Measured at this scale (docs/reproductions/streaming_llm): sinks + window stays flat, but the
  # window-only cache does not blow up either (the two stay within 0.1 nats/token), while full
  # attention past L (unseen RoPE positions) rises above both.
  assert past["sinks_window"] <= base + 0.15
  assert abs(past["window"] - past["sinks_window"]) < 0.1
  assert past_l["full"] > past_l["sinks_window"] + 0.2


@pytest.mark.slow
def test_rope_scaling_small(tmp_path):
  d = _run("rope_scaling", tmp_path, "small")["data"]
  zs, tuned = d["zero_shot"], d["finetune"]["variants"]
  loss = lambda v, n: zs[v][str(n)]["mean_loss"]  # noqa: E731
  # Measured at this scale (docs/reproductions/rope_scaling): NTK and YaRN beat unscaled RoPE at
  # 2L, 4L and 8L; linear interpolation without a finetune is worse than none at every length;
  # after 40 steps at 4L YaRN, not linear, has the lowest loss (linear the highest).
  for n in d["lengths"]:
    assert loss("ntk", n) < loss("none", n) and loss("yarn", n) < loss("none", n)
    assert loss("linear", n) > loss("none", n)
  assert loss("yarn", d["lengths"][-1]) < loss("none", d["lengths"][-1]) - 0.2
  assert d["best_after_finetune"] != "linear"
  assert tuned["linear"]["mean_loss"] > min(t["mean_loss"] for t in tuned.values())


@pytest.mark.slow
def test_landmark_small(tmp_path):
  d = _run("landmark", tmp_path, "small")["data"]
  acc = d["accuracy"]
  L, n = str(d["train_len"]), str(d["eval_len"])
  # Measured at this scale (docs/reproductions/landmark): both models solve the passkey at L
  # (0.94 landmark, 0.97 transformer) and neither finds it at 8L, with or without top-k.
  assert acc["landmark_dense"][L] >= 0.75 and acc["transformer"][L] >= 0.75
  assert max(acc[k][n] for k in acc) <= 0.1


@pytest.mark.slow
def test_duo_attention_small(tmp_path):
  d = _run("duo_attention", tmp_path, "small")["data"]
  acc = d["accuracy"]
  # Measured at this scale (docs/reproductions/duo_attention): full 0.98, Duo 0.78 (more than
  # the 0.1 the claim allows), while the other half of the heads and all-streaming find none:
  # the gates pick the heads that retrieve, but half of the heads is not enough here.
  assert acc["full"] >= 0.8 and 0.5 <= acc["duo"] < acc["full"]
  assert acc["duo_other_half"] <= 0.1 and acc["all_streaming"] <= 0.1
  assert d["kv_ratio"][str(d["train_len"])] == pytest.approx(0.64, abs=0.01)
