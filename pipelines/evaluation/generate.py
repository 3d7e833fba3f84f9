"""Sampling from a model through its decode state (``init_state`` / ``step``), and
``memzoo generate``: text in, the decoded continuation out, with the run's own tokenizer and
optionally a training-free memory (``pipelines.evaluation.memories``) on the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from pipelines.errors import InputError, MissingFileError
from zoo.interface import LanguageModel


def generate(
  model: LanguageModel,
  prompt: np.ndarray,
  num_tokens: int,
  *,
  temperature: float = 0.8,
  seed: int = 0,
  progress: bool = False,
  prefill_chunk: int | None = None,
  stop_id: int | None = None,
) -> np.ndarray:
  """Continues ``prompt [B, P]`` by ``num_tokens`` tokens; returns ``[B, num_tokens]`` int32.

  The prompt is prefilled in one ``step`` call (or in ``prefill_chunk``-token calls, for
  memories whose step takes at most a chunk), then one token per call. ``temperature=0`` is
  greedy. With ``stop_id`` (batch 1), generation ends after that token is produced (the
  output is then shorter).
  """
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise InputError(f"prompt must be [B, P] with P >= 1, got shape {prompt.shape}")
  if num_tokens < 1:
    raise InputError(f"num_tokens must be >= 1, got {num_tokens}")
  batch, plen = prompt.shape
  max_len = plen + num_tokens
  if max_len > model.max_len and not model.unbounded_decode:
    raise InputError(
      f"prompt ({plen}) + num_tokens ({num_tokens}) exceeds the model's max_len={model.max_len}"
    )
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens, dstate, key):
    logits, dstate = nnx.merge(graphdef, state).step(tokens, dstate)
    last = logits[:, -1, :]
    if temperature > 0:
      nxt = jax.random.categorical(key, last / temperature, axis=-1)
    else:
      nxt = jnp.argmax(last, axis=-1)
    return nxt.astype(jnp.int32), dstate

  dstate = model.init_state(batch, max_len)
  key = jax.random.key(seed)
  chunk = prefill_chunk or plen
  for lo in range(0, plen, chunk):
    tok, dstate = step(state, jnp.asarray(prompt[:, lo : lo + chunk]), dstate, key)
  out = []
  for i in tqdm(range(num_tokens), desc="sample", disable=not progress, leave=False):
    out.append(tok)
    if i + 1 == num_tokens or (stop_id is not None and int(tok[0]) == stop_id):
      break
    key = jax.random.fold_in(key, i)
    tok, dstate = step(state, tok[:, None], dstate, key)
  model.release_state(dstate)  # an offloaded memory frees its host store
  return np.stack([np.asarray(t) for t in out], axis=1)


def duo_gate_batches(tok: Any, train_len: int, n: int = 8, steps: int = 30):
  """Passkey inputs at the trained length, built with ``tok``, for Duo's gate fitting (the
  paper's choice); random non-special tokens where a passkey does not fit that length."""
  from pipelines.tasks import get as get_task

  try:
    src = get_task("passkey", length=train_len, seed=7, tokenizer=tok)
  except ValueError:
    src = None

  def batches() -> list[np.ndarray]:
    if src is None:
      rng = np.random.default_rng(7)
      ids = tok.drawable_ids()
      return [ids[rng.integers(0, len(ids), (n, train_len))] for _ in range(steps)]
    return [np.stack([src[s * n + i]["inputs"] for i in range(n)]) for s in range(steps)]

  return batches


def trained_length(exp: Any) -> int:
  """The length the run's model was trained at: its training sequence length, capped by the
  model's position range (an imported model's ``max_position_embeddings``)."""
  return int(min(exp.data.seq_len, getattr(exp.model, "max_len", exp.data.seq_len)))


def generate_text(
  run_dir: str | Path,
  prompt: str,
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  seed: int = 0,
  method: str = "none",
) -> dict[str, Any]:
  """``memzoo generate``: the decoded continuation of ``prompt`` by a run's latest checkpoint.

  Returns ``{"text", "prompt_ids", "ids", "method", "options"}``; generation stops after
  ``max_new_tokens`` tokens or at the tokenizer's EOS.
  """
  from pipelines.data.hf_tokenizer import load_tokenizer
  from pipelines.evaluation import memories
  from pipelines.run import load_run

  if temperature < 0:
    raise InputError(f"--temperature must be >= 0, got {temperature}")
  if max_new_tokens < 1:
    raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
  if method not in memories.METHODS:
    raise InputError(f"unknown --method {method!r}; choose from {', '.join(memories.METHODS)}")
  run_dir = Path(run_dir)
  if not (run_dir / "config.yaml").is_file():
    raise MissingFileError(f"{run_dir} is not a run directory (no config.yaml)")
  exp, model, _ = load_run(run_dir)
  tok = load_tokenizer(run_dir)
  ids = tok.encode_prompt(prompt)
  if ids.size == 0:
    raise InputError("the prompt encodes to no tokens; give some text")
  options: dict[str, Any] = {}
  chunk = None
  if method != "none":
    train_len = trained_length(exp)
    batches = duo_gate_batches(tok, train_len) if method == "duo" else None
    model, options = memories.wrap(
      model, method, train_len, ids.size + max_new_tokens, duo_batches=batches
    )
    chunk = memories.chunk_size(model, train_len)
  out = generate(
    model,
    ids[None, :],
    max_new_tokens,
    temperature=temperature,
    seed=seed,
    prefill_chunk=chunk,
    stop_id=tok.eos_id,
  )[0]
  return {
    "text": tok.decode(out),
    "prompt_ids": ids.tolist(),
    "ids": out.tolist(),
    "method": method,
    "options": options,
  }
