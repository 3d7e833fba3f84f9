"""A model's FLOPs from its shapes: every matmul in its jaxpr plus each op's own count.

XLA's cost analysis counts no FLOPs inside a Pallas call, and counts the masked blocks of a
blockwise XLA op as work, so it cannot give an MFU that compares implementations. Here the
model's forward is traced with ``ops.common.marking_flops()``: each op call (attention, the
gated delta rule, the neural memory) then sits inside a ``jax.jit`` whose name carries the op's
forward FLOPs from its shapes (``forward_flops`` in each op's ``api.py``), and everything else
is counted from the ``dot_general``s of the jaxpr (projections, MLPs, logits, routers), with
``scan`` bodies multiplied by their length. A training step is counted as 3x the forward
(the backward's two products per forward product).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ops.common
from ops.common.dispatch import FLOPS_MARK


def _dot_flops(eqn) -> float:
  (contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  k = int(np.prod([lhs[i] for i in contract])) if contract else 1
  return 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * k


def _sub_jaxprs(params: dict[str, Any]):
  for value in params.values():
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def jaxpr_flops(jaxpr) -> float:
  """FLOPs of a jaxpr: matmuls, marked op calls, scans times their length, a cond's largest
  branch; a while loop's body counts once (its trip count is not static)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    mark = str(eqn.params.get("name", ""))
    if mark.startswith(FLOPS_MARK):
      total += float(mark.rsplit("__", 1)[1])
    elif name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      total += sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn.params))
  return total


def forward_flops(fn, *args: Any) -> float:
  """FLOPs of ``fn(*args)`` with each op counted by its own formula."""
  with ops.common.marking_flops():
    closed = jax.make_jaxpr(fn)(*args)
  return jaxpr_flops(closed.jaxpr)


def model_forward_flops(model: nnx.Module, batch: int, length: int) -> float:
  """FLOPs of ``model(tokens)`` on ``[batch, length]`` tokens."""
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((batch, length), jnp.int32)
  return forward_flops(lambda s, x: nnx.merge(graphdef, s)(x)[0], state, tokens)


def train_step_flops(model: nnx.Module, batch: int, length: int) -> float:
  """FLOPs of one forward+backward: 3x the forward."""
  return 3.0 * model_forward_flops(model, batch, length)
