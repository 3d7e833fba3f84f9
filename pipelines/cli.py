"""The ``memzoo`` command line.

memzoo train RECIPE [key=value ...]         train (resumes from the run's latest checkpoint)
memzoo eval RUN [--suite NAME]              held-out perplexity, synthetic tasks, memory grid
memzoo extrapolate RUN [--factors ...]      loss by position/length, passkey grids, RoPE variants
memzoo demo [RECIPE] [key=value ...]        transformer vs a memory model, extrapolated
memzoo report RUN                           (re)write RUN/report.md
memzoo bench attention|memory|model|context kernel/model speed and memory; longest trainable T
memzoo doctor [--only NAME] [--out FILE]    check and time every kernel on this backend
memzoo models                               list registered model families and presets
memzoo check RECIPE [key=value ...]         validate a config and print it resolved
memzoo recipes                              list the shipped recipes and their purpose
memzoo export RUN --format FMT [--out DIR]  safetensors, hf (Llama/Qwen2/Qwen3) or stablehlo
memzoo import-hf DIR RUN [key=value ...]    a local HF Llama/Mistral/Qwen2/Qwen3 model as a run
memzoo generate RUN --prompt TEXT [--max-new-tokens N] [--temperature T] [--seed S]
                [--method none|streaming|infllm|emllm|duo]   print the decoded continuation

RECIPE is a YAML file or the name of a recipe that ships with the package (transformer_tiny).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ops.common.dispatch import NotSupportedError
from pipelines.errors import ConfigError, InputError, UserError

DEFAULT_DEMO = "demo"


def _train(args) -> int:
  from pipelines import config as config_lib
  from pipelines.train.loop import train

  exp = config_lib.load(args.config, args.overrides)
  result = train(exp)
  last = result.history[-1] if result.history else {}
  print(f"finished step {result.step} in {result.run_dir}: " + json.dumps(last))
  return 0


def _check(args) -> int:
  from pipelines import config as config_lib

  exp = config_lib.load(args.config, args.overrides)
  import yaml

  print(yaml.safe_dump(exp.to_dict(), sort_keys=False))
  return 0


def _eval(args) -> int:
  from pipelines.evaluation import suite as eval_suite

  memory = {}
  if args.suite == "memory":
    from pipelines.evaluation import memories

    methods = tuple(m for m in args.methods.split(",") if m)
    bad = [m for m in methods if m not in memories.METHODS]
    if bad or not methods:
      raise InputError(f"--methods {args.methods!r}: choose from {', '.join(memories.METHODS)}")
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if not tasks or any(t not in ("passkey", "needle_single") for t in tasks):
      raise InputError(f"--tasks {args.tasks!r}: choose from passkey, needle_single")
    if args.digits is not None and args.digits < 1:
      raise InputError(f"--digits must be >= 1, got {args.digits}")
    d = args.digits
    task_params = {
      "passkey": {} if d is None else {"num_digits": d},
      "needle_single": {} if d is None else {"value_digits": d},
    }
    memory = {
      "methods": methods,
      "factors": tuple(float(x) for x in args.factors.split(",")),
      "depths": tuple(float(x) for x in args.depths.split(",")),
      "tasks": tasks,
      "task_params": task_params,
    }
  out = eval_suite.run(args.run, args.suite, n=args.examples, batches=args.batches, **memory)
  print(eval_suite.format_rows(out))
  return 0


def _extrapolate(args) -> int:
  from pipelines.evaluation import extrapolate

  def numbers(flag, text):
    try:
      return tuple(float(x) for x in text.split(","))
    except ValueError:
      raise InputError(f"{flag} must be comma-separated numbers, got {text!r}") from None

  factors = numbers("--factors", args.factors)
  variants = tuple(v for v in args.variants.split(",") if v) if args.variants else None
  res = extrapolate.run(
    args.run,
    factors=factors,
    variants=variants,
    windows=args.windows,
    passkey_examples=args.passkey_examples,
    passkey_factors=numbers("--passkey-factors", args.passkey_factors),
    depths=numbers("--depths", args.depths),
    progress=True,
  )
  for name, v in res["variants"].items():
    losses = "  ".join(f"{n}:{p['mean_loss']:.3f}" for n, p in v["perplexity"].items())
    print(f"{name:14s} loss by length  {losses}")
  print(f"wrote {Path(args.run) / 'extrapolation.json'} and report.md")
  return 0


def _demo(args) -> int:
  from pipelines import demo

  memory = None if args.memory == "none" else args.memory
  path = demo.run(args.config, args.overrides, memory=memory)
  print(f"report: {path}")
  return 0


def _report(args) -> int:
  from pipelines import demo

  print(f"report: {demo.write_report(args.run)}")
  return 0


def _recipes(args) -> int:
  from pipelines import recipes

  for name in recipes.names():
    print(f"{name:22s} {recipes.purpose(name)}")
  print(f"({recipes.recipes_dir()}; run one with: memzoo train NAME [key=value ...])")
  return 0


def _models(args) -> int:
  import zoo

  for name in zoo.list_models():
    fam = zoo.family(name)
    print(f"{name:18s} presets={sorted(zoo.presets(name))}  {fam.description}")
  return 0


def _bench(args) -> int:
  if args.what == "attention":
    from pipelines.bench import attention as bench
  elif args.what == "memory":
    from pipelines.bench import memory as bench
  elif args.what == "model":
    from pipelines.bench import model as bench
  elif args.what == "context":
    from pipelines.bench import context as bench
  else:
    raise ConfigError(f"unknown benchmark {args.what!r}")
  rows = bench.run_cli(args.rest)
  print(bench.format_table(rows))
  return 0


def _reproduce(args) -> int:
  from pipelines import reproduce as rp

  known = rp.all_claims()
  if args.list:
    for c in known.values():
      print(f"{c.name:<16} ~{c.minutes:g} min  {c.paper}: {c.statement}")
    return 0
  names = list(known) if args.all else args.claims
  if not names:
    raise InputError("name a claim, or pass --list or --all")
  for name in names:
    rp.get(name)  # every name checked before anything runs
  settings = rp.Settings(size=args.size, seed=args.seed, out_dir=Path(args.out))
  for name in names:
    print(rp.reproduce(name, settings)["verdict"], flush=True)
  print(f"wrote {rp.write_table(Path(args.out))}")
  return 0


def _doctor(args) -> int:
  from pipelines.bench import doctor

  argv = (["--only", args.only] if args.only else []) + (["--out", args.out] if args.out else [])
  return doctor.main(argv)


def _export(args) -> int:
  from pipelines.interchange import export

  out = export.export(args.run, args.format, args.out)
  print(f"wrote {args.format} export of {args.run} to {out}")
  return 0


def _import_hf(args) -> int:
  from pipelines.interchange import hf

  rest = list(args.rest)
  run = args.run or (rest.pop(0) if rest and "=" not in rest[0] else None)
  if run is None:
    print("memzoo: import-hf: name the run to create: memzoo import-hf DIR RUN", file=sys.stderr)
    return 2
  try:
    run = hf.import_hf(args.dir, run, overrides=rest)
  except FileExistsError as e:
    print(f"memzoo: import-hf: {e}", file=sys.stderr)
    return 2
  print(f"imported {args.dir} as run {run} (step 0)")
  return 0


def _generate(args) -> int:
  from pipelines.evaluation.generate import generate_text

  out = generate_text(
    args.run,
    args.prompt,
    args.max_new_tokens,
    temperature=args.temperature,
    seed=args.seed,
    method=args.method,
  )
  print(out["text"])
  return 0


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="memzoo", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train from a recipe name or a YAML config")
  t.add_argument("config", help="a recipe name (memzoo recipes) or a YAML file")
  t.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=60")
  t.set_defaults(fn=_train)
  c = sub.add_parser("check", help="validate a config and print it resolved")
  c.add_argument("config")
  c.add_argument("overrides", nargs="*")
  c.set_defaults(fn=_check)
  e = sub.add_parser("eval", help="evaluate a run: held-out perplexity and synthetic tasks")
  e.add_argument("run")
  e.add_argument("--suite", default="all", choices=["heldout", "synthetic", "all", "memory"])
  e.add_argument("--examples", type=int, default=32, help="examples per synthetic task")
  e.add_argument("--batches", type=int, default=None, help="held-out batches")
  e.add_argument(
    "--methods",
    default="none,streaming,infllm,emllm,duo",
    help="memory suite: training-free memories to compare on the same weights",
  )
  e.add_argument("--factors", default="1,2,4,8", help="memory suite: lengths as multiples of L")
  e.add_argument("--depths", default="0,0.5,1", help="memory suite: needle depths")
  e.add_argument("--tasks", default="passkey,needle_single", help="memory suite: the grids")
  e.add_argument(
    "--digits", type=int, default=None, help="memory suite: digits of the key/number (5 / 7)"
  )
  e.set_defaults(fn=_eval)
  x = sub.add_parser("extrapolate", help="loss by position/length and passkey grids beyond L")
  x.add_argument("run")
  x.add_argument("--factors", default="1,2,4,8,16", help="lengths as multiples of training L")
  x.add_argument(
    "--variants",
    default=None,
    help="comma-separated: none, linear, ntk, dynamic_ntk, yarn, abf, truncated (RoPE models), "
    "window, sinks_window (attention caches); default: those of none,ntk,yarn,sinks_window that "
    "apply to the run's model",
  )
  x.add_argument("--windows", type=int, default=4, help="held-out windows per length")
  x.add_argument("--passkey-examples", type=int, default=8)
  x.add_argument("--passkey-factors", default="2,4,8", help="passkey lengths as multiples of L")
  x.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey needle depths")
  x.set_defaults(fn=_extrapolate)
  d = sub.add_parser("demo", help="train, evaluate, sample and write a report")
  d.add_argument("config", nargs="?", default=DEFAULT_DEMO)
  d.add_argument("overrides", nargs="*")
  d.add_argument(
    "--memory",
    default="deltanet",
    help="the recurrent-memory family trained beside the transformer ('none': skip it)",
  )
  d.set_defaults(fn=_demo)
  r = sub.add_parser("report", help="write RUN/report.md")
  r.add_argument("run")
  r.set_defaults(fn=_report)
  rc = sub.add_parser("recipes", help="list the recipes that ship with memzoo")
  rc.set_defaults(fn=_recipes)
  rp = sub.add_parser("reproduce", help="run small experiments that test the seed papers' claims")
  rp.add_argument("claims", nargs="*", help="claim names (memzoo reproduce --list)")
  rp.add_argument("--list", action="store_true", help="list the claims and stop")
  rp.add_argument("--all", action="store_true", help="run every claim")
  rp.add_argument("--size", default="small", choices=["tiny", "small", "large"])
  rp.add_argument("--seed", type=int, default=0)
  rp.add_argument("--out", default="reproductions", help="results and REPRODUCTIONS.md go here")
  rp.set_defaults(fn=_reproduce)
  d = sub.add_parser("doctor", help="compile, check and time every kernel on this backend")
  d.add_argument("--only", default=None, help="run the checks whose name contains this")
  d.add_argument("--out", default=None, help="also write the markdown table to this file")
  d.set_defaults(fn=_doctor)
  m = sub.add_parser("models", help="list model families")
  m.set_defaults(fn=_models)
  b = sub.add_parser("bench", help="kernel benchmarks")
  b.add_argument("what", choices=["attention", "memory", "model", "context"])
  b.add_argument("rest", nargs=argparse.REMAINDER)
  b.set_defaults(fn=_bench)
  ex = sub.add_parser("export", help="export a run: safetensors, hf or stablehlo")
  ex.add_argument("run")
  ex.add_argument("--format", required=True, choices=["safetensors", "hf", "stablehlo"])
  ex.add_argument("--out", default=None, help="output directory (default RUN/export/FORMAT)")
  ex.set_defaults(fn=_export)
  ih = sub.add_parser("import-hf", help="turn a local Hugging Face model directory into a run")
  ih.add_argument("dir")
  ih.add_argument("rest", nargs="*", help="RUN (the run to create), then key=value overrides")
  ih.add_argument("--run", default=None, help="the run directory to create (instead of RUN)")
  ih.set_defaults(fn=_import_hf)
  g = sub.add_parser("generate", help="continue a prompt with a run's model and tokenizer")
  g.add_argument("run")
  g.add_argument("--prompt", required=True, help="the text to continue")
  g.add_argument("--max-new-tokens", type=int, default=64)
  g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument(
    "--method",
    default="none",
    choices=["none", "streaming", "infllm", "emllm", "duo"],
    help="a training-free memory on the same weights (none = the model as it is)",
  )
  g.set_defaults(fn=_generate)
  return p


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  args = parser().parse_args(argv)
  try:
    return args.fn(args)
  except UserError as e:
    print(f"memzoo: {e.label}: {e}", file=sys.stderr)
    return e.exit_code
  except NotSupportedError as e:  # an op implementation named explicitly cannot serve the call
    print(f"memzoo: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
