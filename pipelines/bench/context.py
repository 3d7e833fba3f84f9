"""``memzoo bench context``: the longest trainable sequence per remat / offload / context policy.

For a model (a recipe), a per-device memory budget and a device count, the real train step
(``pipelines.train.loop.make_train_step`` on the mesh of ``pipelines.sharding``, batch 1 per data
shard) is compiled at a few short lengths ``T`` for each policy:

- remat ``none`` / ``full`` / ``dots`` / ``offload`` (``zoo.layers.remat``; offload needs a
  backend with pinned host memory and is reported ``n/a on cpu`` elsewhere);
- context sharding: ``context=1`` (the devices form the ``fsdp`` axis, one sequence per device)
  or ``context=devices`` (one sequence split over every device: ring attention and the
  sequence-parallel memory).

Bytes per device are XLA's buffer assignment of the compiled step,
``compiled.memory_analysis()``: arguments + outputs + temporaries - aliased (the donated
parameters and optimizer state are updated in place). Nothing runs, so the parameters, optimizer
state and batch are abstract (shapes with shardings): only compile time is spent.

Memory is affine in ``T`` (parameters and optimizer state, plus activations per token; the
blockwise attention never holds a ``T x T`` matrix) or quadratic (an attention that does).
:func:`fit_curve` fits ``a + b T`` and ``a + b T + c T^2`` to the measured points and keeps
the quadratic only where its ``T^2`` term is visible at the measured lengths;
:func:`longest_length` solves the fit for the budget. The prediction is then checked by
compiling the step at the predicted length.

Several devices on a CPU host are simulated with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``; when this process has fewer devices
the measurement runs in a subprocess with that flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import InputError

GIB = 2**30
POLICIES = ("none", "full", "dots", "offload")
DEFAULT_MODELS = ("transformer_small", "gated_deltanet_tiny:model.preset=small")
DEFAULT_LENGTHS = (2048, 4096, 8192)
# The T^2 term of a quadratic fit must account for this share of the bytes at the longest
# measured length to be kept; below it the curve is affine up to buffer-packing noise.
QUADRATIC_SHARE = 0.01
# Predicted lengths are rounded down to a multiple of this times 2 x context: the ring gives
# each device two equal chunks, and whole attention/memory blocks keep the step's layout the one
# that was measured.
QUANTUM = 512
# A check at the predicted length within this share of the budget confirms the fit; a larger
# miss refits with the checked point, at most this many compiles per row.
CHECK_TOLERANCE = 0.02
CHECK_ROUNDS = 2


# ---------------------------------------------------------------------------------------------
# The fit and the solver (pure numpy)


@dataclasses.dataclass(frozen=True)
class Fit:
  """``bytes(T) = a + b T + c T^2``; ``kind`` is ``"affine"`` (c = 0) or ``"quadratic"``."""

  kind: str
  a: float
  b: float
  c: float = 0.0

  def __call__(self, t: float) -> float:
    return self.a + self.b * t + self.c * t * t


def fit_curve(lengths: Sequence[int], nbytes: Sequence[float]) -> Fit:
  """Least-squares affine and quadratic fits of bytes against ``T``.

  Args:
    lengths: at least two distinct sequence lengths (three to detect a quadratic).
    nbytes: the bytes measured at each length.

  Returns:
    The quadratic fit if there are three or more points and its ``T^2`` term is positive and at
    least ``QUADRATIC_SHARE`` of the bytes at the longest length; the affine fit otherwise.
  """
  t = np.asarray(lengths, np.float64)
  y = np.asarray(nbytes, np.float64)
  if t.shape != y.shape or len(np.unique(t)) < 2:
    raise InputError(f"a fit needs bytes at two or more distinct lengths, got T={list(lengths)}")
  b, a = np.polyfit(t, y, 1)
  if len(np.unique(t)) >= 3:
    c2, b2, a2 = np.polyfit(t, y, 2)
    top = t.argmax()
    if c2 > 0 and c2 * t[top] ** 2 >= QUADRATIC_SHARE * y[top]:
      return Fit("quadratic", float(a2), float(b2), float(c2))
  return Fit("affine", float(a), float(b))


def longest_length(fit: Fit, budget: float, quantum: int = 1) -> int | None:
  """The largest ``T`` (a multiple of ``quantum``) with ``fit(T) <= budget``.

  Returns:
    That length; 0 if even ``T = quantum`` exceeds the budget; None if the fit does not grow
    with ``T`` (no length is ruled out by memory).
  """
  a, b, c = fit.a, fit.b, fit.c
  if c > 0:
    disc = b * b - 4 * c * (a - budget)
    t = (-b + math.sqrt(disc)) / (2 * c) if disc >= 0 else 0.0
  elif b > 0:
    t = (budget - a) / b
  else:
    return None
  best = max(0, int(math.floor(t / quantum)) * quantum)
  # Floating point at the boundary: step down until the fit is within the budget.
  while best > 0 and fit(best) > budget:
    best -= quantum
  return best


# ---------------------------------------------------------------------------------------------
# Compiling the train step


def _experiment(spec: str, length: int, policy: str, devices: int, context: int):
  """The experiment of model ``spec`` (``RECIPE[:key=value,...]``) at length ``length`` with
  batch 1 per data shard on a ``fsdp = devices / context`` x ``context`` mesh."""
  from pipelines import config as config_lib

  recipe, _, extra = spec.partition(":")
  overrides = [o for o in extra.split(",") if o]
  fsdp = devices // context
  base = config_lib.load(recipe, overrides)
  forced = [
    f"data.seq_len={length}",
    f"data.batch_size={fsdp}",
    f"train.remat={policy}",
    "train.grad_accum=1",
    "mesh.data=1",
    f"mesh.fsdp={fsdp}",
    "mesh.tensor=1",
    f"mesh.context={context}",
  ]
  if getattr(base.model, "max_len", None) is not None:
    forced.append(f"model.max_len={max(length, base.model.max_len)}")
  return config_lib.load(recipe, overrides + forced)


def _concrete(tree: Any, mesh: Any) -> Any:
  """Abstract arrays placed on ``mesh``: their own partition spec, or replicated (as
  ``sharding.place_state`` places the optimizer's step count)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  def one(x):
    spec = getattr(getattr(x, "sharding", None), "spec", None) or PartitionSpec()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  return jax.tree.map(one, tree)


def step_memory(spec: str, length: int, policy: str, devices: int = 1, context: int = 1):
  """Compiles the train step of ``spec`` at ``length`` and returns its memory per device.

  Returns:
    ``{"argument", "output", "temp", "alias", "bytes", "compile_s"}`` where ``bytes`` is
    ``argument + output + temp - alias`` (bytes per device).
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  import zoo
  from pipelines import sharding
  from pipelines.run import build_model
  from pipelines.train.loop import make_train_step
  from pipelines.train.optim import optimizer

  exp = _experiment(spec, length, policy, devices, context)
  cfg = exp.train
  mesh = sharding.make_mesh(exp.mesh)

  def build():
    return build_model(exp, cfg.compute_dtype, cfg.remat_policy)

  # The training loop's placement (``sharding.create_sharded``), kept abstract.
  graphdef, abstract, _ = jax.eval_shape(build)
  shardings = sharding.param_shardings(abstract, mesh)
  params = _concrete(jax.eval_shape(jax.jit(lambda: build()[1], out_shardings=shardings)), mesh)
  rest = jax.jit(lambda: build()[2], out_shardings=NamedSharding(mesh, PartitionSpec()))()
  tx = optimizer(cfg)
  opt_state = _concrete(jax.eval_shape(tx.init, params), mesh)
  rows = exp.data.batch_size
  batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh, 2))
  names = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32}
  if zoo.model_class(exp.model.family).accepts_segment_ids:
    names["segment_ids"] = np.int32
  batch = {
    k: jax.ShapeDtypeStruct((rows, length), dt, sharding=batch_sharding) for k, dt in names.items()
  }
  step = make_train_step(graphdef, rest, tx, cfg, mesh)
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, batch).compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  out = {
    "argument": int(m.argument_size_in_bytes),
    "output": int(m.output_size_in_bytes),
    "temp": int(m.temp_size_in_bytes),
    "alias": int(m.alias_size_in_bytes),
  }
  out["bytes"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  out["compile_s"] = round(seconds, 1)
  return out


def _model_label(spec: str) -> str:
  from pipelines import config as config_lib

  recipe, _, extra = spec.partition(":")
  exp = config_lib.load(recipe, [o for o in extra.split(",") if o])
  m = exp.model
  size = f"d{getattr(m, 'd_model', '?')} x {getattr(m, 'n_layers', '?')} layers"
  dtype = exp.train.compute_dtype or getattr(m, "dtype", "")
  return f"{m.family} ({size}, {dtype} compute)"


def _check(row: dict[str, Any], spec: str, devices: int, budget: float, log=None) -> None:
  """Compiles the step at ``row``'s predicted longest length. A measurement off the fit by
  more than ``CHECK_TOLERANCE`` of the budget joins the fitted points (a third point shows a
  quadratic term the short lengths hide), the length is solved again and checked again, up to
  ``CHECK_ROUNDS`` compiles. ``row["checks"]`` lists every check; ``row["verify"]`` is the
  last, and ``row["verified"]`` says whether ``longest_T`` is the length it measured."""
  quantum = QUANTUM * 2 * row["context"]
  points = list(zip(row["lengths"], row["bytes"]))
  row["checks"] = []
  for _ in range(CHECK_ROUNDS):
    fit, t = Fit(**row["fit"]), row["longest_T"]
    m = step_memory(spec, t, row["policy"], devices, row["context"])
    check = {"T": t, "bytes": m["bytes"], "predicted": fit(t), "fit": fit.kind}
    check.update(fits=m["bytes"] <= budget, compile_s=m["compile_s"])
    row["checks"].append(check)
    row["verify"], row["verified"] = check, True
    if log:
      log(
        f"  check remat={row['policy']} context={row['context']} T={t}: "
        f"{m['bytes'] / GIB:.2f} GiB measured, {fit(t) / GIB:.2f} GiB predicted "
        f"({fit.kind} fit), {m['compile_s']}s [bytes={m['bytes']}]"
      )
    if abs(m["bytes"] - fit(t)) <= CHECK_TOLERANCE * budget:
      if m["bytes"] > budget:
        # The fit holds but the rounding left the length a little over: memory grows with T,
        # so the whole quanta that the excess needs at the fit's slope come off (unchecked).
        slope = max(fit.b + 2 * fit.c * t, 1.0)
        steps = math.ceil((m["bytes"] - budget) / (slope * quantum))
        row["longest_T"], row["verified"] = t - steps * quantum, False
      return
    points.append((t, m["bytes"]))
    refit = fit_curve([p[0] for p in points], [p[1] for p in points])
    row["fit"], row["fit_points"] = dataclasses.asdict(refit), [p[0] for p in points]
    row["longest_T"], row["verified"] = longest_length(refit, budget, quantum), False
    if not row["longest_T"]:
      return


def measure(
  spec: str,
  *,
  devices: int = 1,
  lengths: Sequence[int] = DEFAULT_LENGTHS,
  policies: Sequence[str] = POLICIES,
  contexts: Sequence[int] | None = None,
  budget_gib: float = 80.0,
  verify: str = "best",
  log=None,
) -> list[dict[str, Any]]:
  """Measures every (policy, context) of one model on ``devices`` devices of this process.

  Args:
    spec: ``RECIPE[:key=value,...]`` (a shipped recipe name or a YAML file, with overrides).
    devices: devices of the mesh (this process must have at least as many).
    lengths: the measured sequence lengths (global, before context sharding).
    policies: remat policies (``none``, ``full``, ``dots``, ``offload``).
    contexts: context-axis sizes, each dividing ``devices``; default ``1`` and ``devices``.
    budget_gib: the memory budget per device, GiB.
    verify: ``"best"``: check (:func:`_check`: compile at the predicted length, refit and
      check again on a miss) the policy with the longest predicted length; ``"all"``: every
      policy; ``"none"``.
    log: ``print``-like callable for progress, or None.

  Returns:
    One row per (policy, context): ``model, spec, devices, context, policy, lengths, bytes``
    (per length, per device), ``temp``, ``fit`` (kind and coefficients), ``longest_T``,
    ``checks`` / ``verify`` (the last check: ``{T, bytes, predicted, fits}``) / ``verified``
    where checked, and ``status`` (``ok`` or ``n/a on BACKEND``).
  """
  import jax

  from zoo.layers import remat

  if devices > jax.device_count():
    raise InputError(f"{devices} devices requested; this process has {jax.device_count()}")
  contexts = tuple(contexts) if contexts else tuple(sorted({1, devices}))
  for c in contexts:
    if c < 1 or devices % c:
      raise InputError(f"context={c} must divide the device count {devices}")
  for p in policies:
    if p not in POLICIES:
      raise InputError(f"unknown remat policy {p!r}; choose from {', '.join(POLICIES)}")
  budget = budget_gib * GIB
  label = _model_label(spec)
  backend = jax.default_backend()
  rows = []
  for context in contexts:
    for policy in policies:
      row: dict[str, Any] = dict(
        model=label, spec=spec, devices=devices, context=context, policy=policy,
        lengths=list(lengths), bytes=[], temp=[], fit=None, longest_T=None, verify=None,
        verified=None,
        status="ok", backend=backend, budget_gib=budget_gib,
      )  # fmt: skip
      try:
        remat.check_policy(None if policy == "none" else policy, backend)
      except ValueError:
        row["status"] = f"n/a on {backend}"
        rows.append(row)
        continue
      for t in lengths:
        m = step_memory(spec, t, policy, devices, context)
        row["bytes"].append(m["bytes"])
        row["temp"].append(m["temp"])
        if log:
          log(
            f"{spec} devices={devices} context={context} remat={policy} T={t}: "
            f"{m['bytes'] / GIB:.3f} GiB/device (temp {m['temp'] / GIB:.3f}), {m['compile_s']}s "
            f"[bytes={m['bytes']} temp={m['temp']}]"
          )
      fit = fit_curve(lengths, row["bytes"])
      row["fit"] = dataclasses.asdict(fit)
      row["longest_T"] = longest_length(fit, budget, QUANTUM * 2 * context)
      rows.append(row)
  ok = [r for r in rows if r["status"] == "ok" and r["longest_T"]]
  if verify == "best" and ok:
    ok = [max(ok, key=lambda r: r["longest_T"])]
  for row in ok if verify in ("best", "all") else []:
    _check(row, spec, devices, budget, log)
  return rows


def _subprocess_measure(args: list[str], devices: int) -> list[dict[str, Any]]:
  """Runs ``measure`` in a child process with ``devices`` simulated CPU devices."""
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").split()
  flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  # LLVM's optimisation level changes the generated machine code, not XLA's buffer assignment
  # (the bytes measured), and compiles several times faster.
  if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
    flags.append("--xla_backend_optimization_level=0")
  env["XLA_FLAGS"] = " ".join(flags)
  env.setdefault("JAX_PLATFORMS", "cpu")
  with_out = [*args, "--json", "-"]
  proc = subprocess.run(
    [sys.executable, "-m", "pipelines.bench.context", *with_out],
    env=env,
    stdout=subprocess.PIPE,
    text=True,
    check=False,
  )
  if proc.returncode:
    raise RuntimeError(f"the {devices}-device measurement exited with {proc.returncode}")
  return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# Reporting


def _gib(n: float | None) -> str:
  return "" if n is None else f"{n / GIB:.3f}"


def _length(t: int | None) -> str:
  if t is None:
    return "unbounded"
  return f"{t:,}" + (f" ({t / 1e6:.2f}M)" if t >= 500_000 else "")


def format_table(rows: list[dict[str, Any]]) -> str:
  """A markdown table (GiB per device at each measured length, the fit, the longest length
  under the budget and its check) followed by the 8-device answer per model."""
  if not rows:
    return "(no rows)"
  lengths = sorted({t for r in rows for t in r["lengths"]})
  budget = rows[0]["budget_gib"]
  head = ["model", "devices", "mesh", "remat"] + [f"GiB at T={t}" for t in lengths]
  head += ["fit", f"longest T under {budget:g} GiB", "compiled check: GiB at T"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
  for r in rows:
    mesh = f"context={r['context']}" + (
      f", fsdp={r['devices'] // r['context']}" if r["devices"] > r["context"] else ""
    )
    cells = [r["model"], str(r["devices"]), mesh, r["policy"]]
    if r["status"] != "ok":
      cells += [r["status"]] + [""] * (len(head) - 5)
    else:
      at = dict(zip(r["lengths"], r["bytes"]))
      cells += [_gib(at.get(t)) for t in lengths]
      refit = r.get("verified") is False
      points = r.get("fit_points") or r["lengths"]
      fit = r["fit"]["kind"] + (
        f" ({len(points)} points)" if len(points) > len(r["lengths"]) else ""
      )
      cells += [fit, _length(r["longest_T"]) + (" (unchecked)" if refit else "")]
      cells.append(
        "; ".join(
          f"T={c['T']:,}: {c['bytes'] / GIB:.2f} ({'fits' if c['fits'] else 'over'})"
          for c in r.get("checks") or ([r["verify"]] if r.get("verify") else [])
        )
      )
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", *answer_lines(rows)]
  return "\n".join(lines)


def answer_lines(rows: list[dict[str, Any]]) -> list[str]:
  """Per model on the most devices measured: the longest length of any policy (MEMO's "1M
  tokens on 8 GPUs" question asked of this model)."""
  out = []
  for model in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == model and r["status"] == "ok"]
    if not mine:
      continue
    n = max(r["devices"] for r in mine)
    ok = [r for r in mine if r["devices"] == n]
    best = max(ok, key=lambda r: math.inf if r["longest_T"] is None else r["longest_T"])
    out.append(
      f"- {model} on {n} x {best['budget_gib']:g} GiB: longest trainable T = "
      f"{_length(best['longest_T'])} tokens (remat={best['policy']}, context={best['context']})."
    )
  return out


def run_cli(argv: Sequence[str]) -> list[dict[str, Any]]:
  """``memzoo bench context [MODEL ...] [--devices 1 8] [--budget-gib 80] [--lengths T ...]``."""
  p = argparse.ArgumentParser(
    prog="memzoo bench context",
    description="longest trainable sequence per remat / context policy, from the compiled step",
  )
  p.add_argument(
    "models",
    nargs="*",
    default=list(DEFAULT_MODELS),
    help="RECIPE[:key=value,...] (default: %(default)s)",
  )
  p.add_argument("--devices", type=int, nargs="+", default=[1, 8], help="1 and/or N simulated")
  p.add_argument("--budget-gib", type=float, default=80.0, help="memory per device (GiB)")
  p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
  p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
  p.add_argument("--contexts", type=int, nargs="+", default=None, help="default: 1 and devices")
  p.add_argument(
    "--verify",
    default="best",
    choices=("best", "all", "none"),
    help="compile at the predicted longest T: of the best policy per model (default), all, none",
  )
  p.add_argument("--json", default=None, help="also write the rows as JSON here ('-': stdout)")
  a = p.parse_args(list(argv))
  if a.budget_gib <= 0:
    raise InputError(f"--budget-gib must be positive, got {a.budget_gib}")
  if any(d < 1 for d in a.devices):
    raise InputError(f"--devices must be >= 1, got {a.devices}")
  if len(set(a.lengths)) < 2 or any(t < 1 for t in a.lengths):
    raise InputError(f"--lengths needs two or more distinct positive lengths, got {a.lengths}")
  to_stdout = a.json == "-"
  log = (lambda s: print(s, file=sys.stderr, flush=True)) if to_stdout else print
  rows: list[dict[str, Any]] = []
  import jax

  for n in a.devices:
    if n > jax.device_count():
      child = [*a.models, "--devices", str(n), "--budget-gib", str(a.budget_gib)]
      child += ["--lengths", *map(str, a.lengths), "--policies", *a.policies]
      child += ["--contexts", *map(str, a.contexts)] if a.contexts else []
      child += ["--verify", a.verify]
      rows += _subprocess_measure(child, n)
      continue
    for spec in a.models:
      rows += measure(
        spec, devices=n, lengths=a.lengths, policies=a.policies, contexts=a.contexts,
        budget_gib=a.budget_gib, verify=a.verify, log=log,
      )  # fmt: skip
  if to_stdout:
    print(json.dumps(rows))
  elif a.json:
    Path(a.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
  return rows


if __name__ == "__main__":
  # The child of ``_subprocess_measure``: rows as JSON on stdout, progress on stderr.
  from pipelines.errors import UserError

  try:
    run_cli(sys.argv[1:])
  except UserError as e:
    print(f"memzoo: {e.label}: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
