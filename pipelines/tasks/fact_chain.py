"""Fact chaining in filler (BABILong-style bAbI qa1-like): supporting facts scattered in text.

1 hop: "Mary went to the kitchen." -> "Where is Mary?"; 2 hops add "Mary picked up the apple."
-> "Where is the apple?"; 3 hops add "The key is in the apple." -> "Where is the key?". The
person moves several times (only the last move counts) among distractor facts about others.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.errors import InputError
from pipelines.tasks.base import (
  Builder,
  Example,
  TaskSource,
  check_corpus,
  encode_qa,
  haystack,
  insert,
)

PEOPLE = "Mary John Sandra Daniel Emma Oliver Lucas Sophie".split()
PLACES = "kitchen garden office bathroom hallway bedroom cellar balcony".split()
ITEMS = "apple football milk lamp book ring coin key".split()
CONTAINERS = "box bag basket suitcase".split()
_VERBS = ("went to", "moved to", "travelled to", "journeyed to")


def _move(rng, person: str, place: str) -> str:
  return f"{person} {_VERBS[rng.integers(len(_VERBS))]} the {place}. "


class FactChain(TaskSource):
  """Facts in story order at random offsets of the filler; the answer is a place name.

  Metadata: ``hops`` int32, ``support_pos`` int32 ``[3]`` (starts in ``inputs`` of the
  supporting facts: the last move, the pick-up, the containment; -1 when unused).

  Args:
    length: tokens per example.
    hops: supporting facts needed, 1 to 3.
    num_moves: moves of the asked person (only the last one answers the question).
    num_distractors: facts about other people (moves and pick-ups of other things).
    corpus: optional 1-D token array to draw the filler from (default repeated sentences).
    seed, num_examples, tokenizer: see ``TaskSource``.
  """

  name = "fact_chain"

  def __init__(
    self,
    *,
    length: int,
    hops: int = 1,
    num_moves: int = 2,
    num_distractors: int = 4,
    corpus: np.ndarray | None = None,
    seed: int = 0,
    num_examples: int = 10_000,
    tokenizer: Any = None,
  ):
    super().__init__(length=length, seed=seed, num_examples=num_examples, tokenizer=tokenizer)
    if int(hops) not in (1, 2, 3):
      raise InputError(f"fact_chain: hops must be 1, 2 or 3, got {hops}")
    if int(num_moves) < 1 or int(num_distractors) < 0:
      raise InputError(f"fact_chain: bad num_moves={num_moves}/num_distractors={num_distractors}")
    self.hops, self.num_moves = int(hops), int(num_moves)
    self.num_distractors = int(num_distractors)
    self.corpus = None if corpus is None else check_corpus(self.name, corpus, self.tok)
    need = 2 + self._longest_story()
    if need > self.length + 1:
      raise InputError(f"fact_chain: length must be >= {need - 1}, got {self.length}")

  @property
  def chance(self) -> float:
    return 1.0 / len(PLACES)

  def _longest_story(self) -> int:
    """The most tokens a story, question and answer can take, for the length check."""
    n = lambda text: len(self.tok.encode(text))  # noqa: E731
    person, place = max(PEOPLE, key=n), max(PLACES, key=n)
    thing = max(ITEMS + CONTAINERS, key=n)
    fact = max(n(f"{person} journeyed to the {place}. "), n(f"{person} picked up the {thing}. "))
    question = n(f"\nQuestion: Where is the {thing}?\nAnswer: ") + n(person)
    facts = self.num_moves + self.num_distractors + self.hops - 1
    return facts * fact + question + n(place)

  def _story(self, rng: np.random.Generator):
    """Returns facts in order, the indices of the supporting ones, the question and answer."""
    people = [PEOPLE[i] for i in rng.permutation(len(PEOPLE))]
    things = [ITEMS[i] for i in rng.permutation(len(ITEMS))]
    person, others = people[0], people[1:]
    places, place = [], None
    for _ in range(self.num_moves):
      # Drawn from the places other than the current one: the last stays uniform by symmetry.
      choices = [p for p in PLACES if p != place]
      place = choices[rng.integers(len(choices))]
      places.append(place)
    facts = [_move(rng, person, p) for p in places]
    support = [len(facts) - 1]
    question = f"Where is {person}?"
    if self.hops >= 2:
      held = CONTAINERS[rng.integers(len(CONTAINERS))] if self.hops == 3 else things.pop()
      at = int(rng.integers(len(facts) + 1))
      facts.insert(at, f"{person} picked up the {held}. ")
      support = [support[0] + (at <= support[0]), at]
      question = f"Where is the {held}?"
      if self.hops == 3:
        inner = things.pop()
        at = int(rng.integers(len(facts) + 1))
        facts.insert(at, f"The {inner} is in the {held}. ")
        support = [s + (at <= s) for s in support] + [at]
        question = f"Where is the {inner}?"
    for _ in range(self.num_distractors):
      who = others[rng.integers(len(others))]
      if self.hops >= 2 and rng.random() < 0.5:
        fact = f"{who} picked up the {things[rng.integers(len(things))]}. "
      else:
        fact = _move(rng, who, PLACES[rng.integers(len(PLACES))])
      at = int(rng.integers(len(facts) + 1))
      facts.insert(at, fact)
      support = [s + (at <= s) for s in support]
    return facts, support, question, place

  def _example(self, rng: np.random.Generator) -> Example:
    facts, support, question, answer = self._story(rng)
    pieces = [self.tok.encode(f) for f in facts]
    qa = encode_qa(self.tok, [(f"\nQuestion: {question}\nAnswer: ", False), (answer, True)])
    size = self.length + 1 - 2 - sum(p.size for p in pieces) - qa[0].size
    if size < 0:
      raise InputError(f"fact_chain: length {self.length} too short for this story")
    offsets = np.sort(rng.integers(0, size + 1, len(pieces)))
    hay = haystack(rng, size, self.corpus, self.tok)
    tokens, starts, _ = insert(hay, pieces, list(offsets), tok=self.tok)
    b = Builder(self.tok)
    first = b.add(tokens)
    b.add_encoded(*qa)
    b.add([self.tok.eos_id])
    support_pos = np.full(3, -1, np.int32)
    support_pos[: len(support)] = [first + starts[s] for s in support]
    return b.finish(self.length, hops=np.int32(self.hops), support_pos=support_pos)
