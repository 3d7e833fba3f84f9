"""Tests for pipelines/tasks: format, determinism, stated answers, oracle and chance scores."""

import argparse
import math
import pathlib
import re

import grain
import jax.numpy as jnp
import numpy as np
import pytest

import pipelines.tasks as tasks
from pipelines.data.tokenizer import BOS, PAD, SEP, VOCAB_SIZE
from pipelines.tasks.base import decode

# Tolerances and sample sizes, in one place.
# Binomial bound for a guesser's accuracy: |acc - chance| <= Z * sqrt(p (1 - p) / n) + slack.
# Z = 4 keeps a correct generator failing with probability < 1e-4 (the outcome is fixed by the
# seed anyway); the per-example score averages spans, which only shrinks the variance.
CHANCE_Z = 4.0
CHANCE_N = 256
CHANCE_SLACK = 1e-3
# A needle moves back at most this many tokens to a sentence/line start (base.insert's snap).
SNAP = 64
ORACLE_N = 12
QUESTION = "\nWhat is the pass key? The pass key is "

CORPUS = np.frombuffer(pathlib.Path(argparse.__file__).read_bytes(), np.uint8).astype(np.int32)

# (registry name, parameters): every task and variant at a small, odd length.
CASES = [
  ("passkey", dict(length=301, depth=0.5)),
  ("passkey", dict(length=333, num_digits=3, corpus=CORPUS)),
  ("needle_single", dict(length=400, corpus=CORPUS)),
  ("needle_multi_key", dict(length=451, corpus=CORPUS, num_needles=3)),
  ("needle_multi_value", dict(length=452, corpus=CORPUS, num_needles=3, depth=0.2)),
  ("needle_multi_query", dict(length=517, corpus=CORPUS, num_needles=4, num_queries=3)),
  ("mqar", dict(length=97, num_pairs=8, num_queries=5)),
  ("set_disjointness", dict(length=129, small_size=5)),
  ("set_disjointness", dict(length=200, small_size=3, large_size=7, order="random", repeat=True)),
  ("sequence_order", dict(length=301, corpus=CORPUS, segment_length=12, min_gap=5)),
  ("fact_chain", dict(length=511, hops=1, num_moves=3)),
  ("fact_chain", dict(length=600, hops=2, num_distractors=6, corpus=CORPUS)),
  ("fact_chain", dict(length=700, hops=3)),
  ("selective_copy", dict(length=100, num_tokens=8)),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def make(name, params, **over):
  return tasks.get(name, **{**params, **over})


def stack(examples):
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def oracle(source, n):
  """A predict_fn that knows the targets of examples 0..n-1 (looked up by their inputs)."""
  table = {source[i]["inputs"].tobytes(): source[i]["targets"] for i in range(n)}

  def predict(inputs):
    targets = np.stack([table[row.tobytes()] for row in np.asarray(inputs)])
    return jnp.asarray(np.eye(VOCAB_SIZE, dtype=np.float32)[targets])

  return predict


def answers(example):
  """The answer spans' target ids, in span order."""
  spans = example["answer_spans"]
  return [example["targets"][spans == k] for k in range(1, int(spans.max()) + 1)]


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_format(name, params):
  src = make(name, params)
  length = params["length"]
  for i in range(4):
    ex = src[i]
    for key in ("inputs", "targets", "loss_mask", "segment_ids", "answer_spans"):
      assert ex[key].shape == (length,), key
    assert ex["inputs"].dtype == ex["targets"].dtype == np.int32
    assert ex["loss_mask"].dtype == np.float32
    assert ex["inputs"][0] == BOS
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
    assert ex["inputs"].min() >= 0 and ex["inputs"].max() < VOCAB_SIZE
    # loss_mask is exactly the answer tokens; spans are contiguous and numbered in order.
    spans = ex["answer_spans"]
    np.testing.assert_array_equal(ex["loss_mask"], (spans > 0).astype(np.float32))
    assert ex["num_spans"] == spans.max() >= 1
    assert ex["answer_start"] == np.flatnonzero(spans)[0]
    starts = [np.flatnonzero(spans == k) for k in range(1, ex["num_spans"] + 1)]
    assert all(np.all(np.diff(s) == 1) for s in starts)
    assert all(a[-1] < b[0] for a, b in zip(starts, starts[1:]))
    # Segment 1 is a prefix; padding is PAD with segment 0 and no loss.
    seg = ex["segment_ids"]
    real = int(seg.sum())
    np.testing.assert_array_equal(seg[:real], 1)
    np.testing.assert_array_equal(ex["inputs"][real:], PAD)
    assert not ex["loss_mask"][real:].any()
  assert len(src) == 10_000


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_deterministic(name, params):
  a, b = make(name, params), make(name, params)
  for i in (0, 7, 9_999):
    ex, again = a[i], b[np.int64(i)]
    assert ex.keys() == again.keys()
    for key in ex:
      np.testing.assert_array_equal(ex[key], again[key], err_msg=key)
  assert not np.array_equal(a[0]["inputs"], a[1]["inputs"])
  assert not np.array_equal(a[0]["inputs"], make(name, params, seed=1)[0]["inputs"])
  with pytest.raises(IndexError):
    a[len(a)]


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_oracle_scores_perfect_and_guesser_chance(name, params):
  src = make(name, params)
  assert tasks.evaluate(oracle(src, ORACLE_N), src, ORACLE_N, batch_size=5) == {
    "accuracy": 1.0,
    "n": ORACLE_N,
  }
  # A context-free guesser: always the answer of an unscored example, put on every answer span.
  batch = stack([src[i] for i in range(CHANCE_N)])
  guess = answers(src[len(src) - 1])[0]
  pred = np.full_like(batch["targets"], -1)
  for row, spans in enumerate(batch["answer_spans"]):
    for k in range(1, spans.max() + 1):
      where = np.flatnonzero(spans == k)
      if where.size == guess.size:
        pred[row, where] = guess
  acc = tasks.score(pred, batch).mean()
  p = src.chance
  bound = CHANCE_Z * math.sqrt(p * (1 - p) / CHANCE_N) + CHANCE_SLACK
  assert abs(acc - p) <= bound, (acc, p, bound)


# Tasks whose answer spans are single tokens: a constant-logits model is a real guesser.
CONSTANT = [
  ("mqar", dict(length=64, num_pairs=6), 128 + 5),
  ("set_disjointness", dict(length=64, small_size=4), ord("Y")),
  ("sequence_order", dict(length=200, corpus=CORPUS), ord("A")),
  ("selective_copy", dict(length=64, num_tokens=8), ord("c")),
]


@pytest.mark.parametrize("name,params,token", CONSTANT, ids=[c[0] for c in CONSTANT])
def test_constant_model_scores_chance(name, params, token):
  src = make(name, params)

  def constant(inputs):
    logits = np.zeros((*inputs.shape, VOCAB_SIZE), np.float32)
    logits[..., token] = 1.0
    return logits

  out = tasks.evaluate(constant, src, CHANCE_N, batch_size=64)
  p = src.chance
  assert out["n"] == CHANCE_N
  assert abs(out["accuracy"] - p) <= CHANCE_Z * math.sqrt(p * (1 - p) / CHANCE_N) + CHANCE_SLACK


def test_grain_batches():
  src = tasks.get("needle_multi_query", length=340, corpus=CORPUS, num_needles=3)
  ds = grain.MapDataset.source(src).batch(4)
  first = ds[0]
  assert first["inputs"].shape == (4, 340) and first["span_needle_pos"].shape == (4, 2)
  np.testing.assert_array_equal(first["targets"][2], src[2]["targets"])


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_answer_at_stated_position(depth):
  src = tasks.get("passkey", length=600, depth=depth, num_digits=6)
  for i in range(5):
    ex = src[i]
    (key,) = answers(ex)
    key = decode(key)
    assert re.fullmatch(r"\d{6}", key)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    pos = int(ex["needle_pos"])
    assert decode(ex["inputs"][pos : pos + len(needle)]) == needle
    assert decode(ex["inputs"]).count(key) == 3  # twice in the needle, then the answer
    start = int(ex["answer_start"])
    assert decode(ex["inputs"][: start + 1]).endswith(QUESTION)
    assert ex["haystack_size"] == 600 + 1 - (len(needle) + 2 + len(QUESTION) + 6)
    assert depth - SNAP / ex["haystack_size"] <= ex["depth"] <= depth + 1e-6


@pytest.mark.parametrize("variant", ["single", "multi_key", "multi_value", "multi_query"])
def test_needle_answers_at_stated_positions(variant):
  src = tasks.get(
    "needle", variant=variant, length=700, corpus=CORPUS, num_needles=4, num_queries=3
  )
  needle = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\. ")
  for i in range(5):
    ex = src[i]
    text = decode(ex["inputs"])
    found = needle.findall(text)
    assert len(found) == (1 if variant == "single" else 4)
    question = text[text.rindex("Question:") :]
    asked = re.findall(r"[a-z]+-[a-z]+", question)
    values = [decode(a) for a in answers(ex)]
    assert len(values) == {"multi_query": 3, "multi_value": 4}.get(variant, 1)
    for k, (value, pos) in enumerate(zip(values, ex["span_needle_pos"])):
      key, val = needle.match(decode(ex["inputs"][pos : pos + 80])).groups()
      assert val == value
      assert key == (asked[0] if variant == "multi_value" else asked[k])
    if variant == "multi_value":
      assert np.all(np.diff(ex["span_needle_pos"]) > 0)  # answers in order of appearance
    assert ex["needle_pos"] in ex["span_needle_pos"]


@pytest.mark.parametrize("power_a", [None, 0.01])
def test_mqar_answers_at_stated_positions(power_a):
  src = tasks.get(
    "mqar", length=80, num_pairs=10, num_queries=4, token_range=(10, 50), power_a=power_a
  )
  for i in range(5):
    ex = src[i]
    keys = ex["inputs"][1:21:2]
    assert len(set(keys.tolist())) == 10 and keys.min() >= 10 and keys.max() < 30
    q, p = ex["query_pos"], ex["pair_pos"]
    np.testing.assert_array_equal(np.flatnonzero(ex["loss_mask"]), np.sort(q))
    np.testing.assert_array_equal(ex["inputs"][q], ex["inputs"][p])
    np.testing.assert_array_equal(ex["targets"][q], ex["inputs"][p + 1])
    assert np.all((ex["targets"][q] >= 30) & (ex["targets"][q] < 50))
    others = np.setdiff1d(np.arange(21, 80), np.concatenate([q, q + 1]))
    np.testing.assert_array_equal(ex["inputs"][others], SEP)


def test_mqar_power_law_puts_queries_near_the_pairs():
  """Zoology's placement: slot i (1-based) is drawn with weight i^(a-1), so with a = 0.01 the
  first slot after the pairs holds a query far more often than under uniform placement."""
  kw = dict(length=84, num_pairs=10, num_queries=2, num_examples=2000)
  first = {}
  for a in (None, 0.01):
    src = tasks.get("mqar", power_a=a, **kw)
    base = 1 + 2 * 10  # BOS, then the pairs
    first[a] = np.mean([base in src[i]["query_pos"] for i in range(2000)])
  # Uniform: P(a given start is used) ~ Q / (region - Q + 1) = 2/63. Power law, 31 slots, two
  # draws without replacement: the first slot's weight alone is 1 / sum_i i^-0.99 ~ 0.24.
  assert first[None] < 0.06
  assert first[0.01] > 0.3


@pytest.mark.parametrize("order", ["small_first", "large_first"])
@pytest.mark.parametrize("repeat", [False, True])
def test_set_disjointness_label_matches_sets(order, repeat):
  src = tasks.get("set_disjointness", length=90, small_size=3, order=order, repeat=repeat)
  labels = []
  for i in range(16):
    ex = src[i]
    real = ex["inputs"][: int(ex["segment_ids"].sum())]
    parts = np.split(real[1:], np.flatnonzero(real[1:] == SEP))
    sets = [set(p[p != SEP].tolist()) for p in parts[: 4 if repeat else 2]]
    if repeat:
      assert sets[:2] == sets[2:]
    first, second = sets[:2]
    assert (len(first) < len(second)) == (order == "small_first")
    disjoint = not first & second
    assert ex["label"] == disjoint
    assert answers(ex)[0].tolist() == [ord("Y" if disjoint else "N")]
    labels.append(disjoint)
  assert 0 < sum(labels) < 16


def test_sequence_order_answer_matches_text():
  src = tasks.get("sequence_order", length=400, corpus=CORPUS, segment_length=10, min_gap=20)
  for i in range(8):
    ex = src[i]
    f, s = int(ex["first_pos"]), int(ex["second_pos"])
    assert s >= f + 10 + 20
    text = decode(ex["inputs"][: int(ex["answer_start"]) + 1])
    a = text[text.rindex("\nA: ") + 4 : text.rindex("\nB: ")]
    b = text[text.rindex("\nB: ") + 4 : text.rindex("\nAnswer: ")]
    first, second = decode(ex["inputs"][f : f + 10]), decode(ex["inputs"][s : s + 10])
    assert (a, b) == ((first, second) if ex["label"] == 0 else (second, first))
    assert answers(ex)[0].tolist() == [ord("AB"[int(ex["label"])])]


def _solve_babi(text):
  """Answers the question from the facts in the text, independently of the generator."""
  where, holder, inside = {}, {}, {}
  for m in re.finditer(r"(\w+) (?:went|moved|travelled|journeyed) to the (\w+)\. ", text):
    where[m[1]] = m[2]
  for m in re.finditer(r"(\w+) picked up the (\w+)\. ", text):
    holder[m[2]] = m[1]
  for m in re.finditer(r"The (\w+) is in the (\w+)\. ", text):
    inside[m[1]] = m[2]
  asked = re.search(r"Question: Where is (?:the )?(\w+)\?", text)[1]
  thing = inside.get(asked, asked)
  return where[holder.get(thing, thing)]


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_fact_chain_answer_follows_from_facts(hops):
  src = tasks.get("fact_chain", length=800, hops=hops, num_moves=3, num_distractors=5)
  for i in range(10):
    ex = src[i]
    text = decode(ex["inputs"][: int(ex["answer_start"]) + 1])
    (answer,) = answers(ex)
    assert _solve_babi(text) == decode(answer)
    support = ex["support_pos"]
    assert np.all(support[:hops] >= 0) and np.all(support[hops:] == -1)
    last_move = decode(ex["inputs"][support[0] : support[0] + 60])
    assert re.match(rf"\w+ \w+ to the {decode(answer)}\. ", last_move)
    if hops >= 2:
      assert " picked up the " in decode(ex["inputs"][support[1] : support[1] + 40])
    if hops == 3:
      assert decode(ex["inputs"][support[2] : support[2] + 4]) == "The "


def test_selective_copy_answer_is_the_data_in_order():
  src = tasks.get("selective_copy", length=120, num_tokens=10)
  for i in range(5):
    ex = src[i]
    pos = ex["data_pos"]
    np.testing.assert_array_equal(ex["targets"][ex["loss_mask"] > 0], ex["inputs"][pos])
    assert ex["inputs"][int(ex["answer_start"])] == SEP
    region = ex["inputs"][1 : int(ex["answer_start"])]
    np.testing.assert_array_equal(np.flatnonzero(region != ord(".")) + 1, pos)
    assert np.all((region[pos - 1] >= ord("a")) & (region[pos - 1] < ord("q")))


def test_needle_haystack_is_a_random_corpus_window():
  src = tasks.get("needle_single", length=500, corpus=CORPUS)
  tiled = np.concatenate([CORPUS, CORPUS]).astype(np.uint8).tobytes()
  starts = set()
  for i in range(6):
    ex = src[i]
    pos, size = int(ex["needle_pos"]), int(ex["haystack_size"])
    # The corpus is ASCII, so text index c is inputs index c + 1 (BOS decodes to nothing).
    body = ex["inputs"][1 : 1 + decode(ex["inputs"]).rindex("\nQuestion:")]
    hay = np.delete(body, np.arange(pos - 1, pos - 1 + body.size - size))
    assert hay.size == size
    start = tiled.find(hay.astype(np.uint8).tobytes())
    assert start >= 0
    starts.add(start)
  assert len(starts) == 6


@pytest.mark.parametrize("name", ["passkey", "needle_multi_key"])
def test_grid_covers_depths_and_lengths(name):
  depths, lengths = [0.0, 0.25, 0.5, 0.75, 1.0], [400, 640]
  cells = tasks.grid(name, depths=depths, lengths=lengths, corpus=CORPUS)
  assert sorted((c.depth, c.length) for c in cells) == sorted(
    (d, n) for d in depths for n in lengths
  )
  for cell in cells:
    ex = cell.source[0]
    assert ex["inputs"].shape == (cell.length,)
    assert ex["haystack_size"] > SNAP
    assert cell.depth - SNAP / ex["haystack_size"] <= ex["depth"] <= cell.depth + 1e-6


def test_registry():
  names = tasks.list_tasks()
  for name in ("passkey", "needle", "mqar", "set_disjointness", "sequence_order"):
    assert name in names
  assert {"fact_chain", "selective_copy", "needle_multi_value"} <= set(names)
  assert isinstance(tasks.get("mqar", length=64), tasks.MQAR)
  assert tasks.get("needle_multi_query", length=400, corpus=CORPUS).variant == "multi_query"
  with pytest.raises(KeyError, match="did you mean 'passkey'"):
    tasks.get("paskey", length=100)


def test_score_counts_exact_spans():
  batch = {
    "targets": np.array([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]]),
    "answer_spans": np.array([[0, 1, 1, 2, 0], [0, 0, 1, 1, 1]]),
  }
  pred = np.array([[0, 6, 7, 0, 0], [5, 6, 7, 8, 0]])
  np.testing.assert_allclose(tasks.score(pred, batch), [0.5, 0.0])
  np.testing.assert_allclose(tasks.score(batch["targets"], batch), [1.0, 1.0])
  assert tasks.score(pred[0], {k: v[0] for k, v in batch.items()}) == 0.5
  with pytest.raises(ValueError):
    tasks.score(pred[:, :4], batch)


def test_evaluate_counts_partial_batches_once():
  src = tasks.get("set_disjointness", length=40, small_size=2)
  perfect = oracle(src, 5)
  flip = src[4]["inputs"].tobytes()

  def wrong_on_last(inputs):
    logits = np.asarray(perfect(inputs)).copy()
    for row, x in enumerate(inputs):
      if x.tobytes() == flip:
        logits[row] = logits[row, :, ::-1]
    return logits

  assert tasks.evaluate(wrong_on_last, src, 5, batch_size=4) == {"accuracy": 0.8, "n": 5}
  with pytest.raises(ValueError):
    tasks.evaluate(perfect, src, len(src) + 1)


@pytest.mark.parametrize(
  "name,params",
  [
    ("passkey", dict(length=50)),
    ("passkey", dict(length=500, depth=1.5)),
    ("needle", dict(length=500, corpus=CORPUS, variant="multi")),
    ("needle", dict(length=100, corpus=CORPUS)),
    ("needle", dict(length=500, corpus=np.zeros((2, 3), np.int32))),
    ("mqar", dict(length=20, num_pairs=8)),
    ("mqar", dict(length=100, num_pairs=4, gap_token=10)),
    ("mqar", dict(length=100, num_pairs=4, power_a=0.0)),
    ("set_disjointness", dict(length=100, order="sideways")),
    ("sequence_order", dict(length=60, corpus=CORPUS)),
    ("fact_chain", dict(length=100, hops=2)),
    ("fact_chain", dict(length=1000, hops=4)),
    ("selective_copy", dict(length=20, num_tokens=16)),
  ],
)
def test_bad_parameters_fail_before_generating(name, params):
  with pytest.raises(ValueError):
    tasks.get(name, **params)


def test_sequence_order_rejects_repetitive_corpus():
  src = tasks.get("sequence_order", length=200, corpus=np.full(1000, ord("a")))
  with pytest.raises(ValueError, match="repetitive"):
    src[0]
