"""Per-block rematerialisation (gradient checkpointing) with named policies.

A block class decorates its ``__call__`` with :func:`checkpointed`; ``zoo.interface.set_remat``
sets the policy name on every such block of a model. Names:

- ``"full"``: save nothing inside the block; recompute it in the backward pass.
- ``"dots"``: save the results of matmuls without batch dimensions (projections, MLP), recompute
  the rest (norms, activations, attention internals).
- ``"offload"``: as ``"dots"``, but the saved matmul results go to pinned host memory (backends
  with a host memory space: GPU and TPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

POLICIES: dict[str, Callable[[], Any]] = {
  "full": lambda: jax.checkpoint_policies.nothing_saveable,
  "dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "offload": lambda: jax.checkpoint_policies.offload_dot_with_no_batch_dims(
    "device", "pinned_host"
  ),
}
# Backends whose runtime has a pinned host memory space for offloaded residuals.
OFFLOAD_BACKENDS = ("gpu", "tpu")


def check_policy(policy: str | None, backend: str | None = None) -> None:
  """Raises ValueError for an unknown policy, or ``"offload"`` on a backend without host memory."""
  if policy is None:
    return
  if policy not in POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; choose one of {sorted(POLICIES)} or none")
  backend = backend or jax.default_backend()
  if policy == "offload" and backend not in OFFLOAD_BACKENDS:
    raise ValueError(
      f"remat policy 'offload' needs a backend with pinned host memory {OFFLOAD_BACKENDS}, "
      f"not {backend!r}; use 'full' or 'dots'"
    )


def compiler_options(policy: str | None, backend: str | None = None) -> dict[str, str]:
  """XLA options a rematerialised step needs. The CPU compiler expands the optimisation barriers
  that keep a recomputation apart from the forward pass and then merges the two (CSE), which undoes
  remat; keeping the barriers makes CPU honour it as GPU and TPU do."""
  if policy is None or (backend or jax.default_backend()) != "cpu":
    return {}
  return {"xla_disable_hlo_passes": "cse_barrier_expander"}


def _traced(x: Any) -> bool:
  """An array, or a pytree of arrays (a decode state): passed through the remat boundary."""
  leaves = jax.tree.leaves(x)
  return bool(leaves) and all(isinstance(leaf, jax.Array) for leaf in leaves)


class RematBlock:
  """Mixin of a residual block whose ``__call__`` is :func:`checkpointed`; the policy name is a
  static attribute, so it travels in the model's graph definition."""

  remat_policy: str | None = None


def checkpointed(call: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a block's ``__call__`` in ``nnx.remat`` with the block's ``remat_policy``.

  Array arguments (positional or keyword, e.g. ``positions``, ``segment_ids``) pass through the
  remat boundary; everything else (flags, ints, None) stays static.
  """

  @functools.wraps(call)
  def wrapped(self, *args: Any, **kwargs: Any) -> Any:
    name = self.remat_policy
    if name is None:
      return call(self, *args, **kwargs)
    check_policy(name)
    is_array = [_traced(a) for a in args]
    pos_arrays = [a for a, flag in zip(args, is_array) if flag]
    kw_arrays = {k: v for k, v in kwargs.items() if _traced(v)}
    static = {k: v for k, v in kwargs.items() if k not in kw_arrays}

    def body(module, pos_arrays, kw_arrays):
      it = iter(pos_arrays)
      full = [next(it) if flag else a for a, flag in zip(args, is_array)]
      return call(module, *full, **kw_arrays, **static)

    return nnx.remat(body, policy=POLICIES[name]())(self, pos_arrays, kw_arrays)

  return wrapped
