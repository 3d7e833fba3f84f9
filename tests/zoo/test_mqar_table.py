"""The README's MQAR table, reproduced in direction at its default setting (length 64, 8 pairs,
ids [0, 128), chance 1/64; 500 steps x 32): the delta rule learns recall far above chance, and
more of it per float than Taylor linear attention with slightly more state.

The README's three-seed rows: DeltaNet with 2 heads (4,096 floats) 0.89, every seed in
0.75-0.97; linear attention with feature_dim 5 (4,216 floats) 0.47, seeds 0.26-0.72. The ranges
do not overlap, so one seed must keep the order (seed 0: 0.953 vs 0.427). A shorter run does
not: at 200 x 16 DeltaNet is still in its plateau (0.054) while linear attention has started
(0.087).

Gated DeltaNet with 4 heads is held near chance by its initial decay: with Mamba-2's A ~ U(1, 16)
it reads 0.028-0.042 over three seeds, with every head's A = 1 (``a_init_range=(1, 1)``)
0.062-0.093 (seed 0: 0.028 -> 0.093). Mamba-2 with head width 64 and d_state 16 reads 0.050
(seed 0) with its paper's initial decay and 0.116-0.171 over three seeds with the table's slow
one (A ~ U(0, 1); seed 0: 0.116).
"""

import pytest

from pipelines.evaluation.mqar_table import MAMBA2_HD64, SLOW_DECAY, Variant, mqar_table

DELTANET = Variant("deltanet", "deltanet", {"n_heads": 2})
LINEAR = Variant("linear attention", "based", {"feature_dim": 5, "attention_layers": ()})
GDN4 = Variant("gated_deltanet", "gated_deltanet", {"n_heads": 4})
MAMBA2 = {**MAMBA2_HD64, "d_state": 16}
MAMBA2_PAPER = Variant("mamba2", "mamba2", MAMBA2)
MAMBA2_SLOW = Variant("mamba2", "mamba2", {**MAMBA2, "a_init_range": SLOW_DECAY})
GDN4_SLOW = Variant("gated_deltanet", "gated_deltanet", {"n_heads": 4, "a_init_range": (1.0, 1.0)})


@pytest.mark.slow
def test_mqar_table_direction_delta_rule_above_linear_attention():
  rows = mqar_table(variants=(DELTANET, LINEAR))
  acc = {r["label"]: r["accuracy"] for r in rows}
  state = {r["label"]: r["state"] for r in rows}
  chance = rows[0]["chance"]
  assert state["linear attention"] >= state["deltanet"], state  # LA gets equal state or more
  assert acc["deltanet"] >= 5 * chance, acc
  assert acc["deltanet"] > acc["linear attention"], acc


@pytest.mark.slow
def test_mqar_slow_initial_decay_lifts_gated_deltanet():
  rows = mqar_table(variants=(GDN4, GDN4_SLOW))
  paper, slow = (r["accuracy"] for r in rows)
  chance = rows[0]["chance"]
  assert paper < 3 * chance, paper  # Mamba-2's initial decay: in the plateau at this budget
  assert slow > 2 * paper, (paper, slow)  # the same model with a slower initial decay learns


@pytest.mark.slow
def test_mqar_mamba2_with_a_slow_initial_decay_clears_five_times_chance():
  rows = mqar_table(variants=(MAMBA2_PAPER, MAMBA2_SLOW))
  paper, slow = (r["accuracy"] for r in rows)
  chance = rows[0]["chance"]
  assert rows[0]["state"] == rows[1]["state"]
  assert paper < 5 * chance, paper  # the paper's A ~ U(1, 16): not yet at this budget
  assert slow >= 5 * chance, slow
