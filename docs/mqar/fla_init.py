"""MQAR with fla's weight initialisation re-drawn after construction (an ablation, not a model).

``PYTHONPATH=. python docs/mqar/fla_init.py --family mamba2 --overrides '{"n_layers": 2,
"d_state": 16, "d_ff": 128}' --init fla --ablation "m2 d16 fla-init" --append``

Builds the MQAR table's model (``pipelines.evaluation.mqar_table``: same task, budget, seed and
``train_on_task``) and, before training, re-draws its parameters as fla's ``_init_weights`` does
(``fla/models/{gated_deltanet,mamba2}/modeling_*.py``, ``initializer_range`` 0.02):

- every ``nn.Linear`` and the embedding ~ N(0, 0.02): here every ``w*`` projection and ``embed``;
- every ``nn.Conv1d`` ~ N(0, 0.02) too (fla's ``ShortConvolution`` subclasses ``nn.Conv1d``;
  Mamba-2's ``conv1d`` unless ``conv_init`` is set): here the short convolutions' ``weight``
  (``--init fla`` only; ``--init fla-linear`` keeps this repository's convolution init);
- Mamba-2 only (``rescale_prenorm_residual=True``): ``out_proj`` / ``down_proj`` re-drawn
  ``kaiming_uniform(a=sqrt 5)`` (U(+-1/sqrt(fan_in))) and divided by sqrt(n_layers);
- left alone: ``A_log``, ``dt_bias``, ``D``, norms (fla draws dt_bias as this repository does,
  A_log from U(0, 16) for gated DeltaNet where this repository keeps Mamba-2's U(1, 16); norms
  are ones).

``--init repo`` keeps this repository's initialisation (budget ablations: ``--steps 1500``);
``--set dt_bias=-9`` then sets a parameter everywhere (softplus(-9) = 1.2e-4: no decay;
``a_log=0``: A = 1 in every head, the same as the config field ``a_init_range=(1, 1)``).
Prints one row in ``docs/mqar/ablations.json``'s format; ``--append`` adds it to that file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx

import zoo
from pipelines.evaluation.mqar_table import DEFAULT_BUDGET, DEFAULT_TASK
from pipelines.tasks.mqar import MQAR
from pipelines.tasks.training import Budget, train_on_task

ABLATIONS = Path(__file__).with_name("ablations.json")
STD = 0.02  # fla's initializer_range
LEFT_ALONE = {"a_log", "dt_bias", "d_skip", "scale"}


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def fla_reinit(model: nnx.Module, cfg, key: jax.Array, *, convs: bool) -> list[str]:
  """Re-draws ``model``'s parameters in place the fla way; returns the names re-drawn."""
  changed = []

  def redraw(path, x):
    names = [_key_name(k) for k in path if _key_name(k) != "value"]
    name = names[-1]
    is_conv = "conv" in names
    if name in LEFT_ALONE or (is_conv and not convs):
      return x
    if not (name == "embed" or name.startswith("w") or is_conv):
      raise ValueError(f"no fla rule for parameter {names}")
    k = jax.random.fold_in(key, len(changed))
    changed.append("/".join(names))
    if cfg.family == "mamba2" and name in ("w_out", "w_down"):
      # rescale_prenorm_residual: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), then
      # divided by sqrt(num_residuals_per_layer=1 * n_layers).
      bound = math.prod(x.shape[:-1]) ** -0.5
      return jax.random.uniform(k, x.shape, x.dtype, -bound, bound) / cfg.n_layers**0.5
    return STD * jax.random.normal(k, x.shape, x.dtype)

  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree_util.tree_map_with_path(redraw, state))
  return changed


def set_param(model: nnx.Module, name: str, value: float) -> int:
  """Sets every parameter called ``name`` to ``value``; returns how many."""
  hits = []

  def put(path, x):
    if [_key_name(k) for k in path if _key_name(k) != "value"][-1] != name:
      return x
    hits.append(path)
    return jnp.full_like(x, value)

  nnx.update(model, jax.tree_util.tree_map_with_path(put, nnx.state(model, nnx.Param)))
  if not hits:
    raise ValueError(f"no parameter called {name!r}")
  return len(hits)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--family", required=True)
  p.add_argument("--overrides", type=json.loads, default={})
  p.add_argument("--init", choices=("fla", "fla-linear", "repo"), default="fla")
  p.add_argument("--steps", type=int, default=DEFAULT_BUDGET.steps)
  p.add_argument("--batch-size", type=int, default=DEFAULT_BUDGET.batch_size)
  p.add_argument("--lr", type=float, default=DEFAULT_BUDGET.lr)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--set",
    nargs="*",
    default=[],
    metavar="NAME=V",
    help="after any re-draw, set every parameter called NAME to V (e.g. dt_bias=-9: no decay)",
  )
  p.add_argument("--ablation", default=None, help="the row's name")
  p.add_argument("--append", action="store_true", help=f"add the row to {ABLATIONS.name}")
  a = p.parse_args()

  t = DEFAULT_TASK
  kw = {"length": t["length"], "num_pairs": t["num_pairs"], "token_range": t["token_range"]}
  budget = Budget(
    steps=a.steps, batch_size=a.batch_size, lr=a.lr, eval_examples=DEFAULT_BUDGET.eval_examples
  )
  train = MQAR(seed=a.seed, **kw)
  held_out = MQAR(seed=a.seed + 10_000, num_examples=budget.eval_examples, **kw)
  overrides = {"chunk_size": 64, **a.overrides}  # as the table: one chunk per sequence
  cfg = zoo.config(a.family, "tiny", **overrides)

  sets = {k: float(v) for k, v in (e.split("=") for e in a.set)}
  build = zoo.build

  def build_fla(c, *, rngs):
    model = build(c, rngs=rngs)
    if a.init != "repo":
      names = fla_reinit(model, c, jax.random.key(a.seed + 7), convs=a.init == "fla")
      print(f"re-drawn ({len(names)}): {', '.join(names)}", flush=True)
    for name, v in sets.items():
      n = set_param(model, name, v)
      print(f"set {name} = {v} in {n} parameters", flush=True)
    return model

  start = time.perf_counter()
  with mock.patch.object(zoo, "build", build_fla):
    result = train_on_task(cfg, train, held_out, budget, seed=a.seed)
  row = {
    "ablation": a.ablation or f"{a.family} {a.init}-init",
    "family": a.family,
    "overrides": a.overrides,
    "param_edits": {
      **({} if a.init == "repo" else {"init": a.init}),
      **{f"{k}:set": v for k, v in sets.items()},
    },
    "lr": a.lr,
    "steps": a.steps,
    "batch_size": a.batch_size,
    "seed": a.seed,
    "accuracy": round(result["accuracy"], 3),
    "last_train_loss": round(result["last_loss"], 3),
    "seconds": round(time.perf_counter() - start),
  }
  print(json.dumps(row), flush=True)
  if a.append:
    data = json.loads(ABLATIONS.read_text())
    data["rows"].append(row)
    ABLATIONS.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
  main()
