"""Long-context training: data mixtures, curricula with RoPE switches, position synthesis."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from pipelines import config as config_lib
from pipelines.config import DataConfig
from pipelines.data import loader, mixture
from pipelines.errors import ConfigError, InputError
from pipelines.run import build_model, load_run
from pipelines.train.checkpoint import Checkpointer
from pipelines.train.loop import loss_fn, stage_seed, train
from pipelines.train.metrics import read


def loss_of(graphdef, params, rest, batch):
  """The training loss, jitted (eager ops are slow on CPU)."""
  return float(jax.jit(lambda p, r, b: loss_fn(graphdef, p, r, b)[0])(params, rest, batch))


def forward(graphdef, params, rest, tokens):
  return np.asarray(jax.jit(lambda p, r, t: nnx.merge(graphdef, p, r)(t)[0])(params, rest, tokens))


MODEL = {"preset": "tiny", "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64}
TRAIN = {
  "lr": 1e-2,
  "warmup_steps": 2,
  "log_every": 1,
  "eval_every": 0,
  "checkpoint_every": 2,
  "async_checkpoint": False,
  "progress": False,
}
MIX = [
  {"name": "long", "min_tokens": 4000, "weight": 0.7},
  {"name": "short", "max_tokens": 4000, "weight": 0.3},
]
STAGES = [
  {"name": "short", "steps": 3},
  {"name": "long", "steps": 3, "seq_len": 64, "batch_size": 2, "rope_theta": 500000.0},
]


def experiment(tmp_path, name, train=None, data=None):
  raw = {
    "model": dict(MODEL),
    "data": {
      "source": "stdlib",
      "max_documents": 30,
      "seq_len": 32,
      "batch_size": 4,
      **(data or {}),
    },
    "mesh": {"data": 1},
    "train": {"steps": 6, "stages": STAGES, **TRAIN, **(train or {})},
    "run_dir": str(tmp_path / name),
  }
  return config_lib.from_dict(raw)


def letters_corpus(tmp_path, letter, n=6):
  """Text files holding only ``letter`` (rows of this source are recognisable by their bytes)."""
  folder = tmp_path / letter
  folder.mkdir(parents=True)
  for i in range(n):
    (folder / f"{i}.txt").write_text(letter * (200 + 37 * i))
  return str(folder)


def origin(row):
  """Which source a row came from: its bytes are all 'a', all 'b', or neither (the task)."""
  body = row["inputs"][row["inputs"] < 256]
  if body.size and np.all(body == ord("a")):
    return "a"
  if body.size and np.all(body == ord("b")):
    return "b"
  return "task"


def mixed_rows(tmp_path, weights, n_rows=600):
  sources = (
    {"kind": "text", "name": "a", "paths": [letters_corpus(tmp_path, "a")], "weight": weights[0]},
    {"kind": "text", "name": "b", "paths": [letters_corpus(tmp_path, "b")], "weight": weights[1]},
    {"kind": "task", "task": "mqar", "task_args": {"num_pairs": 2}, "weight": weights[2]},
  )
  cfg = DataConfig(source="stdlib", max_documents=20, seq_len=32, batch_size=10, mixture=sources)
  data = loader.build(cfg, vocab_size=260)
  it = iter(loader.mixture_dataset(cfg, data, 260, seed=3))
  rows = []
  for _ in range(n_rows // cfg.batch_size):
    b = next(it)
    rows += [{k: v[i] for k, v in b.items()} for i in range(cfg.batch_size)]
  return [origin(r) for r in rows]


def test_mixture_proportions_within_sampling_error(tmp_path):
  weights = (0.5, 0.3, 0.2)
  labels = mixed_rows(tmp_path / "one", weights)
  n = len(labels)
  for name, w in zip(("a", "b", "task"), weights):
    share = labels.count(name) / n
    # Three binomial standard errors: a fair coin with these weights stays inside.
    assert abs(share - w) <= 3 * np.sqrt(w * (1 - w) / n), (name, share, w)
  # The weights drive the mix: swapping them swaps the shares.
  swapped = mixed_rows(tmp_path / "two", (0.2, 0.3, 0.5))
  assert swapped.count("task") > 2 * labels.count("task")
  assert swapped.count("a") < labels.count("a") / 2


def test_corpus_split_by_document_length():
  cfg = DataConfig(source="stdlib", max_documents=30, seq_len=32, batch_size=4)
  data = loader.build(cfg, vocab_size=260)
  stream = (data.train.tokens, data.train.doc_ids)
  lengths = np.bincount(data.train.doc_ids)
  cut = int(np.median(lengths))
  long_src, short_src = (
    mixture.build_source(
      config_lib.SourceConfig(**kw), cfg, stream, vocab_size=260, tokenizer=data.tokenizer, seed=0
    )
    for kw in ({"min_tokens": cut}, {"max_tokens": cut})
  )
  assert np.bincount(long_src.doc_ids).min() >= cut
  assert np.bincount(short_src.doc_ids).max() < cut
  # Together they hold every training token exactly once.
  assert len(long_src.tokens) + len(short_src.tokens) == len(data.train.tokens)


def test_mixture_resume_mid_stream_gives_same_batches():
  cfg = DataConfig(
    source="stdlib",
    max_documents=30,
    seq_len=32,
    batch_size=4,
    mixture=tuple(config_lib.SourceConfig(**m) for m in MIX),
    position_factor=4.0,
  )
  data = loader.build(cfg, vocab_size=260)
  a = iter(loader.mixture_dataset(cfg, data, 260, seed=5))
  for _ in range(3):
    next(a)
  state = json.loads(json.dumps(a.get_state()))  # as a checkpoint stores it
  expected = [next(a) for _ in range(3)]
  fresh = iter(loader.mixture_dataset(cfg, data, 260, seed=5))
  fresh.set_state(state)
  for e in expected:
    got = next(fresh)
    for k in ("inputs", "positions", "loss_mask"):
      np.testing.assert_array_equal(got[k], e[k])
  other = iter(loader.mixture_dataset(cfg, data, 260, seed=6))
  assert not np.array_equal(
    next(other)["inputs"], next(iter(loader.mixture_dataset(cfg, data, 260, seed=5)))["inputs"]
  )


def test_synthesized_positions_cover_range_and_increase_within_documents():
  rng = np.random.default_rng(0)
  length, factor = 64, 4
  span = length * factor
  seen = []
  for _ in range(200):
    # Rows of one to four documents, as packing makes them.
    cuts = np.sort(rng.choice(np.arange(1, length), rng.integers(0, 4), replace=False))
    seg = np.zeros(length, np.int32)
    for c in cuts:
      seg[c:] += 1
    pos = mixture.synthesize_positions(seg + 1, span, 2, rng)
    assert pos.min() >= 0 and pos.max() < span
    for s in np.unique(seg):
      p = pos[seg == s]
      assert p[0] == 0  # a document starts at position 0, as at inference
      assert np.all(np.diff(p) > 0)
    seen.append(pos)
  seen = np.concatenate(seen)
  # The declared range [0, kL) is covered: every eighth of it is hit, up to its top.
  assert np.all(np.bincount(seen * 8 // span, minlength=8) > 0)
  assert seen.max() >= 0.95 * span
  # Without synthesis (k = 1) positions never leave the training length.
  plain = mixture.synthesize_positions(np.ones(length, np.int32), length, 2, rng)
  np.testing.assert_array_equal(plain, np.arange(length))


def test_synthesized_positions_reach_the_model(tmp_path):
  exp = experiment(tmp_path, "pos", train={"steps": 1, "stages": []}, data={"position_factor": 8})
  data = loader.build(exp.data, vocab_size=260)
  batch = next(iter(loader.mixture_dataset(exp.data, data, 260, seed=0)))
  assert batch["positions"].max() >= exp.data.seq_len  # beyond the row length
  graphdef, params, rest = build_model(exp)
  with_pos = loss_of(graphdef, params, rest, batch)
  plain = {k: v for k, v in batch.items() if k != "positions"}
  without = loss_of(graphdef, params, rest, plain)
  assert abs(with_pos - without) > 1e-4
  # Families without position ids are refused at config time.
  with pytest.raises(ConfigError, match="does not take position ids"):
    config_lib.from_dict({"model": {"name": "deltanet"}, "data": {"position_factor": 2}})


def test_abf_switch_changes_exactly_the_rope_base(tmp_path):
  exp = experiment(tmp_path, "abf")
  plan = config_lib.stage_plan(exp)
  assert [(s.start, s.end) for s in plan] == [(0, 3), (3, 6)]
  m0, m1 = (dataclasses.asdict(s.exp.model) for s in plan)
  assert {k for k in m0 if m0[k] != m1[k]} == {"rope_base"}
  assert (m0["rope_base"], m1["rope_base"]) == (10000.0, 500000.0)
  # The parameters carry over (same tree and shapes); the switch changes the function.
  g0, p0, r0 = build_model(plan[0].exp)
  g1, p1, r1 = build_model(plan[1].exp)
  assert jax.tree.structure(p0) == jax.tree.structure(p1)
  tokens = np.arange(64, dtype=np.int32)[None] % 200
  out0 = forward(g0, p0, r0, tokens)
  out1 = forward(g1, p0, r1, tokens)
  assert float(np.abs(out0 - out1).max()) > 1e-4
  # Position interpolation and families without RoPE.
  lin = experiment(
    tmp_path,
    "lin",
    train={"stages": [STAGES[0], {"steps": 3, "rope_scaling": {"kind": "linear", "factor": 2}}]},
  )
  a, b = (dataclasses.asdict(s.exp.model) for s in config_lib.stage_plan(lin))
  assert {k for k in a if a[k] != b[k]} == {"rope_scaling"} and b["rope_scaling"]["factor"] == 2
  with pytest.raises(ConfigError, match="has no rope_base"):
    config_lib.from_dict(
      {
        "model": {"name": "deltanet"},
        "train": {"steps": 2, "stages": [{"steps": 2, "rope_theta": 1e5}]},
      }
    )
  # train.steps is the run's length: a short run ends inside a stage, a long one extends the last.
  spans = lambda steps: [
    (s.start, s.end)
    for s in config_lib.stage_plan(experiment(tmp_path, "n", train={"steps": steps}))
  ]
  assert spans(2) == [(0, 2)] and spans(4) == [(0, 3), (3, 4)] and spans(9) == [(0, 3), (3, 9)]
  short = experiment(tmp_path, "short", train={"steps": 2})
  assert config_lib.final_experiment(short).data.seq_len == 32


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("straight")
  # Every step is kept, so the parameters at the stage boundary can be read back.
  train_cfg = {"checkpoint_every": 1, "keep_checkpoints": 10}
  exp = experiment(tmp, "run", train=train_cfg, data={"mixture": MIX, "position_factor": 2})
  return exp, train(exp)


def test_resume_across_stage_switch_equals_uninterrupted(straight, tmp_path):
  _, done = straight

  class Killed(Exception):
    pass

  def die(step, _):
    if step == 3:  # the step-2 checkpoint is mid-mixture in stage 0; the switch is at step 4
      raise Killed

  exp = experiment(tmp_path, "resumed", data={"mixture": MIX, "position_factor": 2})
  with pytest.raises(Killed):
    train(exp, on_step=die)
  assert Checkpointer(exp.run_dir).latest_step() == 2
  resumed = train(exp)
  for a, b in zip(jax.tree.leaves(done.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  record = json.loads((tmp_path / "resumed" / "stages.json").read_text())
  assert [s["seq_len"] for s in record["stages"]] == [32, 64]
  assert [(e["stage"], e["step"], e["resumed"]) for e in record["events"]] == [
    (0, 1, False),
    (0, 3, True),
    (1, 4, False),
  ]
  metrics = read(tmp_path / "resumed" / "metrics.jsonl")
  assert [(r["step"], r["stage"], r["seq_len"]) for r in metrics][2:4] == [(3, 0, 32), (4, 1, 64)]
  # The trained model is read back as its last stage made it.
  exp_loaded, model, _ = load_run(exp.run_dir)
  assert exp_loaded.data.seq_len == 64 and model.blocks[0].attn.rope_base == 500000.0


def test_stage_switch_carries_parameters(straight):
  """The first loss of stage 1 is the stage-1 model (new RoPE base) applied to the parameters
  stage 0 ended with (the step-3 checkpoint), on stage 1's first batch."""
  exp, done = straight
  _, at_switch, _ = load_run(exp.run_dir, step=3)
  params = nnx.state(at_switch, nnx.Param)
  plan = config_lib.stage_plan(exp)
  s1 = plan[1].exp
  data = loader.build(s1.data, vocab_size=260)
  batch = next(iter(loader.mixture_dataset(s1.data, data, 260, stage_seed(exp.seed, 1))))
  g1, _, r1 = build_model(s1)
  logged = {r["step"]: r["loss"] for r in done.history}
  np.testing.assert_allclose(logged[4], loss_of(g1, params, r1, batch), rtol=1e-5)
  # With the stage-0 model (old base) the same loss differs: the switch took effect.
  g0, _, r0 = build_model(plan[0].exp)
  assert abs(loss_of(g0, params, r0, batch) - logged[4]) > 1e-5


def test_bad_mixture_sources_fail_with_one_clear_line():
  cfg = DataConfig(source="stdlib", max_documents=20, seq_len=32, batch_size=2)
  data = loader.build(cfg, vocab_size=260)
  stream = (data.train.tokens, data.train.doc_ids)
  build = lambda **kw: mixture.build_source(
    config_lib.SourceConfig(**kw), cfg, stream, vocab_size=260, tokenizer=data.tokenizer, seed=0
  )
  with pytest.raises(InputError, match="unknown task 'mqr'.*did you mean 'mqar'"):
    build(kind="task", task="mqr")
  with pytest.raises(InputError, match="too few for one row"):
    build(min_tokens=10**9)
  with pytest.raises(ConfigError, match="weight must be > 0"):
    config_lib.from_dict({"data": {"mixture": [{"weight": 0}]}})
