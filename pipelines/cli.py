"""The ``memzoo`` command line.

memzoo train CONFIG.yaml [key=value ...]    train (resumes from the run's latest checkpoint)
memzoo eval RUN [--suite NAME]              held-out perplexity and synthetic tasks
memzoo extrapolate RUN [--factors ...]      loss by position/length, passkey grids, RoPE variants
memzoo demo [CONFIG.yaml] [key=value ...]   train + evaluate + sample + report
memzoo report RUN                           (re)write RUN/report.md
memzoo bench attention|memory|model         kernel and model speed/memory tables
memzoo doctor [--only NAME] [--out FILE]    check and time every kernel on this backend
memzoo models                               list registered model families and presets
memzoo check CONFIG.yaml [key=value ...]    validate a config and print it resolved
memzoo export RUN --format FMT [--out DIR]  safetensors, hf (Llama directory) or stablehlo
memzoo import-hf DIR --run RUN              a local HF Llama/Mistral/Qwen2 model as a run
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipelines.config import ConfigError

DEFAULT_DEMO = "configs/demo.yaml"


def _train(args) -> int:
  from pipelines import config as config_lib
  from pipelines.train import train

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
  from pipelines import eval_suite

  out = eval_suite.run(args.run, args.suite, n=args.examples, batches=args.batches)
  print(eval_suite.format_rows(out))
  return 0


def _extrapolate(args) -> int:
  from pipelines import extrapolate

  factors = tuple(float(x) for x in args.factors.split(","))
  variants = tuple(args.variants.split(","))
  res = extrapolate.run(
    args.run,
    factors=factors,
    variants=variants,
    windows=args.windows,
    passkey_examples=args.passkey_examples,
  )
  for name, v in res["variants"].items():
    losses = "  ".join(f"{n}:{p['mean_loss']:.3f}" for n, p in v["perplexity"].items())
    print(f"{name:14s} loss by length  {losses}")
  print(f"wrote {Path(args.run) / 'extrapolation.json'} and report.md")
  return 0


def _demo(args) -> int:
  from pipelines import demo

  path = demo.run(args.config, args.overrides)
  print(f"report: {path}")
  return 0


def _report(args) -> int:
  from pipelines import demo

  print(f"report: {demo.write_report(args.run)}")
  return 0


def _models(args) -> int:
  import zoo

  for name in zoo.list_models():
    fam = zoo.family(name)
    print(f"{name:18s} presets={sorted(zoo.presets(name))}  {fam.description}")
  return 0


def _bench(args) -> int:
  if args.what == "attention":
    from pipelines import bench_attention as bench
  elif args.what == "memory":
    from pipelines import bench_memory as bench
  elif args.what == "model":
    from pipelines import bench_model as bench
  else:
    raise ConfigError(f"unknown benchmark {args.what!r}")
  rows = bench.run_cli(args.rest) if hasattr(bench, "run_cli") else None
  if rows is None:
    fn = getattr(bench, f"bench_{args.what}")
    rows = fn()
  print(bench.format_table(rows))
  return 0


def _doctor(args) -> int:
  from pipelines import doctor

  argv = (["--only", args.only] if args.only else []) + (["--out", args.out] if args.out else [])
  return doctor.main(argv)


def _export(args) -> int:
  from pipelines import export

  out = export.export(args.run, args.format, args.out)
  print(f"wrote {args.format} export of {args.run} to {out}")
  return 0


def _import_hf(args) -> int:
  from pipelines import hf

  try:
    run = hf.import_hf(args.dir, args.run)
  except FileExistsError as e:
    print(f"memzoo: import-hf: {e}", file=sys.stderr)
    return 2
  print(f"imported {args.dir} as run {run} (step 0)")
  return 0


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="memzoo", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train from a YAML config")
  t.add_argument("config")
  t.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=60")
  t.set_defaults(fn=_train)
  c = sub.add_parser("check", help="validate a config and print it resolved")
  c.add_argument("config")
  c.add_argument("overrides", nargs="*")
  c.set_defaults(fn=_check)
  e = sub.add_parser("eval", help="evaluate a run: held-out perplexity and synthetic tasks")
  e.add_argument("run")
  e.add_argument("--suite", default="all", choices=["heldout", "synthetic", "all"])
  e.add_argument("--examples", type=int, default=32, help="examples per synthetic task")
  e.add_argument("--batches", type=int, default=None, help="held-out batches")
  e.set_defaults(fn=_eval)
  x = sub.add_parser("extrapolate", help="loss by position/length and passkey grids beyond L")
  x.add_argument("run")
  x.add_argument("--factors", default="1,2,4,8,16", help="lengths as multiples of training L")
  x.add_argument(
    "--variants",
    default="none,ntk,yarn,sinks_window",
    help="none, linear, ntk, dynamic_ntk, yarn, abf, truncated, window, sinks_window",
  )
  x.add_argument("--windows", type=int, default=4, help="held-out windows per length")
  x.add_argument("--passkey-examples", type=int, default=8)
  x.set_defaults(fn=_extrapolate)
  d = sub.add_parser("demo", help="train, evaluate, sample and write a report")
  d.add_argument("config", nargs="?", default=DEFAULT_DEMO)
  d.add_argument("overrides", nargs="*")
  d.set_defaults(fn=_demo)
  r = sub.add_parser("report", help="write RUN/report.md")
  r.add_argument("run")
  r.set_defaults(fn=_report)
  d = sub.add_parser("doctor", help="compile, check and time every kernel on this backend")
  d.add_argument("--only", default=None, help="run the checks whose name contains this")
  d.add_argument("--out", default=None, help="also write the markdown table to this file")
  d.set_defaults(fn=_doctor)
  m = sub.add_parser("models", help="list model families")
  m.set_defaults(fn=_models)
  b = sub.add_parser("bench", help="kernel benchmarks")
  b.add_argument("what", choices=["attention", "memory", "model"])
  b.add_argument("rest", nargs=argparse.REMAINDER)
  b.set_defaults(fn=_bench)
  ex = sub.add_parser("export", help="export a run: safetensors, hf or stablehlo")
  ex.add_argument("run")
  ex.add_argument("--format", required=True, choices=["safetensors", "hf", "stablehlo"])
  ex.add_argument("--out", default=None, help="output directory (default RUN/export/FORMAT)")
  ex.set_defaults(fn=_export)
  ih = sub.add_parser("import-hf", help="turn a local Hugging Face model directory into a run")
  ih.add_argument("dir")
  ih.add_argument("--run", required=True, help="the run directory to create")
  ih.set_defaults(fn=_import_hf)
  return p


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  args = parser().parse_args(argv)
  try:
    return args.fn(args)
  except ConfigError as e:
    print(f"memzoo: config error: {e}", file=sys.stderr)
    return 2
  except (FileNotFoundError, ValueError) as e:
    print(f"memzoo: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
