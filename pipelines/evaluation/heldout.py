"""Held-out evaluation of a run: loss, bits per byte, and the unigram baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flax import nnx

from pipelines.data import loader
from pipelines.data.hf_tokenizer import load_tokenizer
from pipelines.run import load_run
from pipelines.train.loop import evaluate_loss, make_eval_step


def heldout(run_dir: str | Path, batches: int | None = None) -> dict[str, Any]:
  """Held-out loss and bits per byte of a run's latest checkpoint, with the unigram baseline."""
  exp, model, step = load_run(run_dir)
  tok = load_tokenizer(Path(run_dir))
  data = loader.build(exp.data, vocab_size=exp.model.vocab_size, tokenizer=tok)
  n = batches or exp.eval.batches
  eval_batches = loader.heldout_batches(data.heldout, exp.data.batch_size, n)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  result = evaluate_loss(
    make_eval_step(graphdef, rest), params, eval_batches, token_bytes=tok.token_bytes()
  )
  return {
    "step": step,
    "heldout_loss": result["loss"],
    "heldout_bits_per_byte": result["bits_per_byte"],
    "unigram_bits_per_byte": data.manifest["unigram_bits_per_byte"],
    "heldout_sequences": len(eval_batches) * exp.data.batch_size,
  }
