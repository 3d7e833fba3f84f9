"""The contract every model family meets; pipelines call it and never probe a model.

A family's top-level model subclasses :class:`ZooModel` (which satisfies :class:`LanguageModel`)
and implements ``__call__``, ``init_state`` and ``step``; it overrides ``state_size``,
``accepts_segment_ids`` and ``unbounded_decode`` where its defaults are wrong for it. Two training
options act on any model the same way:

- Remat: residual blocks mix in :class:`zoo.layers.remat.RematBlock` and decorate ``__call__``
  with :func:`zoo.layers.remat.checkpointed` (wrapper families that run a backbone's blocks
  themselves go through ``zoo.layers.cache.forward_blocks``, which honours the same setting);
  :func:`set_remat` turns it on for every block of a built model.
- Compute dtype: every config carries it as ``dtype``, on itself or on the ``backbone`` config it
  wraps; :func:`with_compute_dtype` sets it wherever it lives, before the model is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
from flax import nnx

from zoo.layers.remat import POLICIES, RematBlock, check_policy


@runtime_checkable
class LanguageModel(Protocol):
  """What pipelines may call on any model.

  - ``model(tokens [B,T] int32, segment_ids [B,T] | None) -> (logits [B,T,V] f32, aux dict)``.
  - ``model.init_state(batch, max_len=None) -> state`` and ``model.step(tokens [B,t], state) ->
    (logits [B,t,V], state)``: stepping through a sequence gives the forward's logits.
  - ``model.state_size() -> int | None``: floats of recall state per sequence (None: it grows
    with the sequence, a KV cache).
  - ``accepts_segment_ids``: whether packed rows are read as separate documents. False: the
    family is defined on one stream per row and the loader must not pack.
  - ``accepts_positions``: whether ``model(tokens, segment_ids, positions=[B,T] int32)`` takes
    explicit position ids (training with synthesized positions); False for the others.
  - ``max_len``: the longest sequence the model is built for; ``unbounded_decode``: ``step``
    may run past it (constant-size decode state).
  - ``model.release_state(state)``: frees what a decode state holds off device (InfLLM's
    host store); a no-op for the others.
  """

  config: Any
  accepts_segment_ids: bool

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> Any: ...

  def init_state(self, batch: int, max_len: int | None = None) -> Any: ...

  def step(self, tokens: jax.Array, state: Any) -> Any: ...

  def state_size(self) -> int | None: ...

  def release_state(self, state: Any) -> None: ...

  @property
  def max_len(self) -> int: ...

  @property
  def unbounded_decode(self) -> bool: ...


class ZooModel(nnx.Module):
  """Base of every family's model: the contract's defaults."""

  accepts_segment_ids: ClassVar[bool] = True
  accepts_positions: ClassVar[bool] = False
  config: Any

  def state_size(self) -> int | None:
    """Floats of recall state per sequence; None (the default): grows with the sequence."""
    return None

  def release_state(self, state: Any) -> None:
    """Frees what a decode state holds outside device arrays (a host-offloaded memory)."""
    del state

  @property
  def max_len(self) -> int:
    """The longest sequence the model is built for (``config.max_len``)."""
    return self.config.max_len

  @property
  def unbounded_decode(self) -> bool:
    """Whether ``step`` may run past ``max_len``: true when the decode state has a fixed size."""
    return self.state_size() is not None


def set_remat(model: nnx.Module, policy: str | None) -> int:
  """Sets the remat policy (``zoo.layers.remat.POLICIES`` name, or None) on every residual block
  of ``model``; returns how many blocks it reached (0 means the family has no blocks to remat,
  which is an error for a policy other than None)."""
  check_policy(policy)
  count = 0
  for _, module in nnx.iter_graph(model):
    if isinstance(module, RematBlock):
      module.remat_policy = policy
      count += 1
  if policy is not None and not count:
    raise ValueError(f"{type(model).__name__} has no residual blocks to rematerialise")
  return count


def with_compute_dtype(config: Any, dtype: str | None) -> Any:
  """``config`` with its compute dtype set to ``dtype`` (None: unchanged). The dtype is the
  config's ``dtype`` field or, for a family that wraps a backbone, the backbone's."""
  if dtype is None:
    return config
  names = {f.name for f in dataclasses.fields(config)}
  if "dtype" in names:
    return dataclasses.replace(config, dtype=dtype)
  if "backbone" in names:
    return dataclasses.replace(config, backbone=with_compute_dtype(config.backbone, dtype))
  raise TypeError(f"{type(config).__name__} has neither a dtype nor a backbone config")


__all__ = ["POLICIES", "LanguageModel", "ZooModel", "set_remat", "with_compute_dtype"]
