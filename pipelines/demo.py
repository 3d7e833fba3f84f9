"""The demo job: why the zoo exists, in a few minutes on a CPU.

It trains the tiny transformer on the embedded corpus (the experiment in the config), then one
recurrent-memory family on the same data with the same budget, evaluates both on held-out text,
samples from the transformer, and reads all of them past the training length ``L``: loss by
position at 1x, 2x and 4x ``L`` for the transformer as trained, the transformer with attention
sinks + a sliding window (StreamingLLM's cache policy, same weights), and the memory model. The
report gets one picture and a three-line verdict computed from the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipelines import config as config_lib
from pipelines import plots, report
from pipelines.data.hf_tokenizer import load_tokenizer
from pipelines.errors import InputError
from pipelines.evaluation import extrapolate, memories
from pipelines.evaluation import heldout as evaluate
from pipelines.evaluation.generate import generate
from pipelines.run import load_run
from pipelines.rundir import atomic_write_text
from pipelines.train.loop import train
from pipelines.train.metrics import read

MEMORY_FAMILY = "deltanet"  # the strongest recurrent memory per float in the MQAR table
FACTORS = (1, 2, 4)
WINDOWS = 4  # held-out windows per length


def memory_run_dir(run_dir: str | Path, family: str = MEMORY_FAMILY) -> Path:
  """Where the demo's memory model lives: a folder inside the transformer's run."""
  return Path(run_dir) / family


def run(
  config_path: str,
  overrides: list[str] | None = None,
  *,
  memory: str | None = MEMORY_FAMILY,
  factors: tuple[float, ...] = FACTORS,
  windows: int = WINDOWS,
) -> Path:
  """Trains (or resumes) the transformer and the memory model, evaluates, extrapolates and
  writes ``report.md``; returns the report path. ``memory=None`` trains only the transformer."""
  overrides = list(overrides or [])
  exp = config_lib.load(config_path, overrides)
  mem_exp = None
  if memory is not None:
    # Same data, budget and seed; only the model changes. Validated before any training.
    mem_exp = config_lib.load(
      config_path,
      overrides + [f"model.name={memory}", f"run_dir={memory_run_dir(exp.run_dir, memory)}"],
    )
  train(exp)
  if mem_exp is not None:
    train(mem_exp)
  path = write_report(exp.run_dir)
  if mem_exp is not None:
    compare(exp.run_dir, mem_exp.run_dir, factors=factors, windows=windows)
  return path


def write_report(run_dir: str | Path) -> Path:
  run_dir = Path(run_dir)
  exp, model, step = load_run(run_dir)
  history = read(run_dir / "metrics.jsonl")
  plot = report.loss_curve(history, run_dir / "loss.png", f"{exp.model.family}: training loss")
  ev = evaluate.heldout(run_dir)
  atomic_write_text(run_dir / "eval.json", json.dumps(ev, indent=2))
  tok = load_tokenizer(run_dir)
  samples = []
  if exp.eval.sample_tokens:
    prompt = tok.encode_prompt(exp.eval.sample_prompt)[None, :]
    out = generate(
      model, prompt, exp.eval.sample_tokens, temperature=exp.eval.temperature, seed=exp.seed
    )
    samples.append(exp.eval.sample_prompt + tok.decode(out[0]))
  manifest = json.loads((run_dir / "data.json").read_text())
  beats = ev["heldout_bits_per_byte"] < ev["unigram_bits_per_byte"]
  body = [
    f"Model `{exp.model.family}` trained for {step} steps of {exp.data.batch_size} x "
    f"{exp.data.seq_len} tokens on the `{manifest['source']}` corpus "
    f"({manifest['files']} files, {manifest['bytes']:,} bytes, "
    f"sha256 `{manifest['sha256'][:16]}`).",
    "",
    f"![training loss]({plot.name})",
    "",
    report.markdown_table(
      [
        {"metric": "held-out loss (nats/token)", "value": ev["heldout_loss"]},
        {"metric": "held-out bits per byte", "value": ev["heldout_bits_per_byte"]},
        {"metric": "unigram byte model, bits per byte", "value": ev["unigram_bits_per_byte"]},
      ]
    ),
    "",
    f"The model {'beats' if beats else 'does NOT beat'} the unigram baseline "
    f"({ev['heldout_sequences']} held-out sequences).",
  ]
  if samples:
    body += ["", "### Sample", "", "```", *samples, "```"]
  out = run_dir / "report.md"
  if not out.exists():
    atomic_write_text(out, f"# memzoo run report: `{run_dir.name}`\n\n")
  report.write_section(out, "Training and held-out evaluation", "\n".join(body))
  return out


def compare(
  run_dir: str | Path,
  memory_dir: str | Path,
  *,
  factors: tuple[float, ...] = FACTORS,
  windows: int = WINDOWS,
) -> dict[str, Any]:
  """Loss by position past the training length for the transformer, the transformer with
  sinks + window and the memory model; writes ``demo.json``, ``demo_extrapolation.png`` and the
  report section "Transformer vs a recurrent memory"; returns what it writes to JSON."""
  run_dir, memory_dir = Path(run_dir), Path(memory_dir)
  exp, tf, _ = load_run(run_dir)
  mexp, mem, mstep = load_run(memory_dir)
  if (mexp.data.seq_len, mexp.data.source) != (exp.data.seq_len, exp.data.source):
    raise InputError(f"{memory_dir} was not trained on the same data as {run_dir}")
  train_len = exp.data.seq_len
  lengths = sorted({int(train_len * f) for f in factors})
  stream = extrapolate.heldout_stream(exp)
  # StreamingLLM on the transformer's weights: its decode cache holds only the sinks and the
  # window (constant in the stream's length), where a windowed mask alone still caches every key.
  tf_policy, _ = memories.wrap(tf, "streaming", train_len, lengths[-1])
  tf_long = extrapolate.with_config(
    tf, extrapolate.variant_config(exp.model, "none", train_len, lengths[-1])
  )
  models = {
    exp.model.family: tf_long,
    f"{exp.model.family} + sinks/window": tf_policy,
    mexp.model.family: mem,
  }
  results: dict[str, Any] = {
    "model": "demo",
    "train_len": train_len,
    "lengths": lengths,
    "variants": {},
    "heldout_bits_per_byte": {
      exp.model.family: json.loads((run_dir / "eval.json").read_text())["heldout_bits_per_byte"]
      if (run_dir / "eval.json").exists()
      else evaluate.heldout(run_dir)["heldout_bits_per_byte"],
      mexp.model.family: evaluate.heldout(memory_dir)["heldout_bits_per_byte"],
    },
    "state_floats": {},
  }
  bar = tqdm(total=len(models) * len(lengths), desc="extrapolate")
  for name, model in models.items():
    per_length = {}
    for n in lengths:
      bar.set_postfix_str(f"{name} @ {n}")
      losses = extrapolate.position_losses(
        model, extrapolate.heldout_windows(stream, n, windows), train_len
      )
      per_length[str(n)] = {
        "mean_loss": float(losses.mean()),
        "loss_within_train_len": float(losses[:train_len].mean()),
        "loss_beyond_train_len": float(losses[train_len:].mean()) if n > train_len else None,
        "position_loss": losses.tolist(),
      }
      bar.update(1)
    results["variants"][name] = {"perplexity": per_length}
    results["state_floats"][name] = {str(n): extrapolate.state_floats(model, n) for n in lengths}
  bar.close()
  (run_dir / "demo.json").write_text(json.dumps(results))
  png = plots.loss_by_position(
    results, run_dir / "demo_extrapolation.png", f"trained at L={train_len}"
  )
  rows = []
  for name, v in results["variants"].items():
    row: dict[str, Any] = {"model": name}
    for n, p in v["perplexity"].items():
      row[f"loss@{n}"] = p["mean_loss"]
    row[f"loss beyond L @{lengths[-1]}"] = v["perplexity"][str(lengths[-1])][
      "loss_beyond_train_len"
    ]
    row[f"state floats @{lengths[-1]}"] = f"{results['state_floats'][name][str(lengths[-1])]:,}"
    rows.append(row)
  body = [
    f"`{mexp.model.family}` trained for {mstep} steps on the same data, seed and budget. "
    f"Loss (nats/token) by total length on held-out text ({windows} windows per length); "
    f"`+ sinks/window` is StreamingLLM on the transformer's weights (no retraining): its cache "
    f"keeps the first {memories.SINKS} keys and the last {train_len - memories.SINKS}, with "
    "positions inside the cache.",
    "",
    report.markdown_table(rows),
    "",
    f"![loss by position]({png.name})",
    "",
    "Verdict:",
    "",
    *[f"- {line}" for line in verdict(results)],
  ]
  report.write_section(run_dir / "report.md", "Transformer vs a recurrent memory", "\n".join(body))
  return results


def verdict(results: dict[str, Any]) -> list[str]:
  """Three lines read off the numbers: within L, beyond L, and the state each model keeps."""
  names = list(results["variants"])
  tf, policy, mem = names
  n = str(results["lengths"][-1])
  train_len = results["train_len"]
  bpb = results["heldout_bits_per_byte"]
  beyond = {k: results["variants"][k]["perplexity"][n]["loss_beyond_train_len"] for k in names}
  within = {k: results["variants"][k]["perplexity"][n]["loss_within_train_len"] for k in names}
  better = tf if bpb[tf] < bpb[mem] else mem
  first = (
    f"Within the training length, {better} is ahead: held-out {bpb[tf]:.3f} bits/byte "
    f"({tf}) vs {bpb[mem]:.3f} ({mem})."
  )
  if beyond[tf] is None:
    return [first, "No length beyond L was measured.", ""]
  order = sorted(names, key=lambda k: beyond[k])
  second = (
    f"Past L={train_len} (positions {train_len}-{n}), {order[0]} reads best "
    f"({beyond[order[0]]:.3f} nats/token), then {order[1]} ({beyond[order[1]]:.3f}), then "
    f"{order[2]} ({beyond[order[2]]:.3f}); the plain {tf} goes from {within[tf]:.3f} within L "
    f"to {beyond[tf]:.3f} beyond it."
  )
  first_n = str(results["lengths"][0])
  s = {k: (v[first_n], v[n]) for k, v in results["state_floats"].items()}
  grows = lambda k: "grows" if s[k][1] > s[k][0] else "constant"
  third = (
    f"Decode state from {first_n} to {n} tokens: {tf} {s[tf][0]:,} -> {s[tf][1]:,} floats "
    f"({grows(tf)}), {policy} {s[policy][0]:,} -> {s[policy][1]:,} ({grows(policy)}), "
    f"{mem} {s[mem][0]:,} -> {s[mem][1]:,} ({grows(mem)})."
  )
  return [first, second, third]
