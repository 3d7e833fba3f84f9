"""``memzoo reproduce`` claims zoology, jrt, titans and infllm: each runs end to end at size
``tiny`` (files, record shapes, finite numbers; the verdict means nothing there) and, in the
slow set, at size ``small`` in the direction reported in ``docs/reproductions``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipelines import reproduce as rp
from pipelines.reproduce.claims._b_common import Interleave
from pipelines.tasks import get as get_task


def _finite(values) -> bool:
  if isinstance(values, dict):
    return all(_finite(v) for v in values.values())
  if isinstance(values, (list, tuple)):
    return all(_finite(v) for v in values)
  return math.isfinite(values)


def _tiny(name, tmp_path):
  rec = rp.reproduce(name, rp.Settings(size="tiny", seed=0, out_dir=tmp_path, progress=False))
  saved = json.loads((tmp_path / name / "result.json").read_text())
  assert saved["claim"] == name and saved["size"] == "tiny"
  assert saved["verdict"].startswith(f"{name}: ") and saved["measured"] in saved["verdict"]
  assert (tmp_path / name / f"{name}.png").stat().st_size > 1000
  assert saved["data"] == json.loads(json.dumps(rec["data"]))
  return saved["data"]


def _small(name, tmp_path):
  return rp.reproduce(name, rp.Settings(size="small", seed=0, out_dir=tmp_path, progress=False))


def test_interleave_alternates_its_sources():
  a = get_task("set_disjointness", length=24, small_size=2, large_size=6, seed=1)
  b = get_task("set_disjointness", length=24, small_size=2, large_size=6, seed=2, repeat=True)
  mix = Interleave([a, b])
  for i in range(4):
    want = (a, b)[i % 2][i // 2]
    assert all(np.array_equal(mix[i][k], want[k]) for k in ("inputs", "targets", "loss_mask"))
  # The repeated context is longer: the two halves of the stream differ in format.
  assert mix[1]["segment_ids"].sum() > mix[0]["segment_ids"].sum()
  with pytest.raises(ValueError, match="one length"):
    Interleave([a, get_task("set_disjointness", length=32, small_size=2, large_size=6)])


# ~54 s on 2 shared cores (compiles for every model and length): in the slow set.
@pytest.mark.slow
def test_infllm_tiny(tmp_path):
  data = _tiny("infllm", tmp_path)
  assert data["lengths"] == [data["train_len"], 2 * data["train_len"]]
  for method in ("none", "infllm"):
    assert len(data["accuracy"][method]) == 2 and _finite(data["accuracy"][method])
  # InfLLM keeps sinks + window + blocks: less state than the full cache at 2x L? Not at this
  # size; but both are positive byte counts of real decode states.
  assert data["kv_bytes_at_far"]["none"] > 0 and data["kv_bytes_at_far"]["infllm"] > 0
  assert data["options"]["infllm"]["window"] == data["train_len"] // 2


def test_jrt_tiny(tmp_path):
  data = _tiny("jrt", tmp_path)
  keys = {f"{o}/{p}" for o in ("small_first", "large_first") for p in ("once", "JRT-Prompt")}
  assert set(data["accuracy"]) == keys and _finite(data["accuracy"])
  assert set(data["gap"]) == {"once", "JRT-Prompt"} and data["state_floats"] > 0
  assert _finite([data["first_loss"], data["last_loss"]])


@pytest.mark.slow  # over 20 s on 2 cores (compiles several steps)
def test_zoology_tiny(tmp_path):
  data = _tiny("zoology", tmp_path)
  assert set(data["curves"]) == {"based", "linear attention"}
  for curve in data["curves"].values():
    assert all(p["state"] > 0 and len(p["seeds"]) == len(data["seeds"]) for p in curve)
    assert _finite([p["accuracy"] for p in curve])
  # BASED's window layer adds state on top of linear attention at the same feature size.
  assert data["curves"]["based"][0]["state"] > data["curves"]["linear attention"][0]["state"]
  assert set(data["linear_at_based_state"]) == {str(p["state"]) for p in data["curves"]["based"]}


def test_zoology_interpolates_linear_attention_in_log_state():
  from pipelines.reproduce.claims.zoology import curves, interpolate

  rows = [
    {"label": "linear attention", "state": 1000, "accuracy": 0.2},
    {"label": "linear attention", "state": 1000, "accuracy": 0.4},
    {"label": "linear attention", "state": 100_000, "accuracy": 0.9},
  ]
  cv = curves(rows)["linear attention"]
  assert cv[0][:2] == (1000, pytest.approx(0.3)) and cv[0][2] == [0.2, 0.4]
  assert interpolate(cv, 10_000) == pytest.approx(0.6)  # halfway in log state
  assert interpolate(cv, 10) == pytest.approx(0.3)  # held at the ends


# ~110 s on 2 shared cores (compiles for every model and length): in the slow set.
@pytest.mark.slow
def test_titans_tiny(tmp_path):
  data = _tiny("titans", tmp_path)
  assert data["lengths"] == [data["train_len"] * f for f in (1, 2, 4)]
  for name in ("MAC", "sliding window"):
    assert len(data["accuracy"][name]) == 3 and _finite(data["accuracy"][name])
    assert _finite(data["loss_first_last"][name])
  assert set(data["mac_minus_window"]) == {"1x", "2x", "4x"}


@pytest.mark.slow
def test_infllm_small_beats_plain_at_8x_but_below_the_floor(tmp_path):
  # Reported in docs/reproductions/infllm: the plain transformer retrieves at L (0.96) and not
  # at 8x (0.00); InfLLM on the same weights stays near 0.3 at every length (0.29 at 8x), above
  # plain at 8x but under the claim's floor of 0.5.
  rec = _small("infllm", tmp_path)
  acc = rec["data"]["accuracy"]
  assert not rec["holds"]
  assert acc["none"][0] > 0.8 and acc["none"][-1] < 0.1
  assert acc["infllm"][-1] > acc["none"][-1] + 0.15 and acc["infllm"][-1] < 0.5


@pytest.mark.slow
def test_jrt_small_does_not_learn_the_task(tmp_path):
  # Reported in docs/reproductions/jrt: at this budget the linear-attention model stays at
  # chance on set disjointness (loss ln 2), so the order effect cannot be tested.
  rec = _small("jrt", tmp_path)
  data = rec["data"]
  assert not rec["holds"] and not data["learned"]
  assert data["last_loss"] > 0.65 and all(0.4 < a < 0.6 for a in data["accuracy"].values())


@pytest.mark.slow
def test_zoology_small_rises_with_state_but_based_not_above_at_the_small_size(tmp_path):
  # Reported in docs/reproductions/zoology (one seed, 300 steps): both curves rise with state
  # (BASED 0.12 -> 0.34, linear attention 0.17 -> 0.38); BASED lies below linear attention at
  # its smaller state (0.12 vs 0.20) and level with it at the larger (0.34 vs 0.32).
  rec = _small("zoology", tmp_path)
  data = rec["data"]
  assert not rec["holds"] and all(data["rising"].values())
  small, large = (str(p["state"]) for p in data["curves"]["based"])
  based = {str(p["state"]): p["accuracy"] for p in data["curves"]["based"]}
  assert based[small] < data["linear_at_based_state"][small]
  assert abs(based[large] - data["linear_at_based_state"][large]) < 0.15


@pytest.mark.slow
def test_titans_small_mac_retrieves_at_l_but_not_past_it(tmp_path):
  # Reported in docs/reproductions/titans (300 steps): the sliding-window transformer never
  # retrieves (its window is shorter than the question); MAC does at L (0.30) but falls to
  # 0.05 at 2x and 0.00 at 4x L.
  rec = _small("titans", tmp_path)
  acc = rec["data"]["accuracy"]
  assert not rec["holds"]
  assert max(acc["sliding window"]) < 0.05
  assert acc["MAC"][0] > 0.15 and acc["MAC"][0] > acc["MAC"][1] >= acc["MAC"][2]
