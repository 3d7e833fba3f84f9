"""JRT-Prompt: show a recurrent model its context twice, for any zoo model (training-free).

A recurrent model that reads the context a second time already knows, from the first pass, what
will be asked about, so it can keep the right things in its fixed-size state (JRT Sec. 4).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def repeat_context(tokens: jax.Array, context_len: int, repeats: int = 2) -> jax.Array:
  """``[ctx, rest]`` -> ``[ctx] * repeats + [rest]``; ``tokens [B,T]``, ``ctx = tokens[:, :L]``."""
  _check(tokens, context_len, repeats)
  ctx = tokens[:, :context_len]
  return jnp.concatenate([ctx] * repeats + [tokens[:, context_len:]], axis=1)


def jrt_prompt(
  model: Any, tokens: jax.Array, context_len: int, *, repeats: int = 2, **call_kwargs: Any
) -> tuple[jax.Array, dict[str, Any]]:
  """The model's logits for ``tokens [B,T]`` when its context is read ``repeats`` times.

  Returns ``(logits [B,T,vocab], aux)``: logits at the positions of the last copy of the context
  and of the rest, aligned with ``tokens`` (position t predicts token t + 1, as without JRT).
  """
  logits, aux = model(repeat_context(tokens, context_len, repeats), **call_kwargs)
  return logits[:, (repeats - 1) * context_len :], aux


def jrt_prompt_prefill(
  model: Any,
  context: jax.Array,
  *,
  repeats: int = 2,
  max_len: int | None = None,
  **step_kwargs: Any,
) -> tuple[jax.Array, Any]:
  """Feeds ``context [B,L]`` ``repeats`` times into a fresh decode state.

  Returns ``(logits [B,L,vocab]`` of the last copy, ``state)``; continue with ``model.step``.
  ``step_kwargs`` go to the prefill ``step`` (e.g. ``prefix=True`` for JRT-RNN, which then reads
  the whole repeated context as its non-causal prefix).
  """
  b, n = context.shape
  _check(context, n, repeats)
  state = model.init_state(b, max_len or repeats * n + 1)
  logits, state = model.step(jnp.concatenate([context] * repeats, axis=1), state, **step_kwargs)
  return logits[:, (repeats - 1) * n :], state


def _check(tokens: jax.Array, context_len: int, repeats: int) -> None:
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B,T], got shape {tokens.shape}")
  if not 1 <= context_len <= tokens.shape[1]:
    raise ValueError(f"context_len must lie in [1, T={tokens.shape[1]}], got {context_len}")
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
