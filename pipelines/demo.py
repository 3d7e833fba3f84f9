"""The demo job: train the tiny transformer on the embedded corpus, evaluate, sample, report."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import config as config_lib
from pipelines import evaluate, report
from pipelines.generate import generate
from pipelines.metrics import read
from pipelines.rundir import atomic_write_text
from pipelines.tokenizers import load_tokenizer
from pipelines.train import load_run, train


def run(config_path: str, overrides: list[str] | None = None) -> Path:
  """Trains (or resumes), evaluates and writes ``report.md``; returns the report path."""
  exp = config_lib.load(config_path, overrides)
  train(exp)
  return write_report(exp.run_dir)


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
