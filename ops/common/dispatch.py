"""Choosing an implementation of an op, and recording which one served each call.

Every op has a table ``IMPLEMENTATIONS`` (name -> :class:`Implementation`, loaded lazily so a
broken or platform-specific kernel file only breaks itself) and a table ``DEFAULTS`` (backend ->
names to try in order). :func:`dispatch` then runs:

- ``implementation=None``: the backend's ordered list (Pallas first where it exists, then
  ``xla``); each refusal is logged once with its reason and the next name is tried;
- one name: exactly that implementation; a call it cannot serve raises
  :class:`NotSupportedError` (never a silent fallback);
- a sequence of names: tried in order; if none serves, the error lists every failure.

The backend is ``jax.default_backend()``, or ``MEMZOO_SIMULATE_BACKEND=gpu|tpu``: dispatch then
chooses exactly as on that backend, and the Pallas kernels run in interpret mode on the CPU.

A Pallas implementation refuses when it raises anything while being traced (a
:class:`NotSupportedError`, or an error of the kernel's tracing), and, when the program is
built for the kernel's own platform (present or simulated), when the kernel fails to lower for
that platform: the forward and backward are lowered once per call signature while the call is
traced, and on the device itself also compiled, so a Triton or Mosaic failure falls back
instead of crashing the compile of the whole step. Failures past XLA's compile of the step
(e.g. at run time) cannot be caught here.

``interpret=None`` follows the platform being lowered for, never the host's: the kernel is
wrapped in ``lax.platform_dependent`` (interpret mode for ``cpu``, the compiled kernel for any
other platform), so ``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` on a CPU
host lowers the real kernel.

:func:`served` returns the process-wide record of which implementation served each op (and
what refused), which the train loop writes to the run directory.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SIMULATE_ENV = "MEMZOO_SIMULATE_BACKEND"
SIMULATED_BACKENDS = ("gpu", "tpu")

log = logging.getLogger("ops.dispatch")

# Starts the reason of a refusal that was an error (a crash or a lowering failure), not a
# limit the implementation declares with NotSupportedError.
FAILED = "failed: "


class NotSupportedError(ValueError):
  """An implementation cannot serve this call (shape, dtype, mask or platform)."""


def simulated_backend() -> str | None:
  """``MEMZOO_SIMULATE_BACKEND`` (``"gpu"`` or ``"tpu"``), or None when unset.

  Raises:
    ValueError: the variable holds anything else.
  """
  value = os.environ.get(SIMULATE_ENV, "").strip().lower()
  if not value:
    return None
  if value not in SIMULATED_BACKENDS:
    raise ValueError(
      f"{SIMULATE_ENV}={value!r} is not a backend dispatch can simulate; use one of "
      f"{SIMULATED_BACKENDS} or unset it"
    )
  return value


def backend() -> str:
  """The backend dispatch chooses for: the simulated one, else ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
  sim = simulated_backend()
  if sim is not None:
    return sim
  name = jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def _lowering_platform(platform: str) -> str:
  """The ``lowering_platforms`` name of a kernel platform (``"gpu"`` -> cuda or rocm)."""
  if platform != "gpu":
    return platform
  if jax.default_backend() == "gpu":
    version = getattr(jax.devices()[0].client, "platform_version", "").lower()
    return "rocm" if "rocm" in version else "cuda"
  return "cuda"


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One implementation of an op: ``module.function``, imported on first use.

  Attributes:
    module: dotted module path, e.g. ``"ops.attention.xla"``.
    function: the function in it, with the op's implementation signature (it takes
      ``interpret``; non-Pallas implementations ignore it).
    platform: for a Pallas kernel, the platform it compiles for (``"gpu"`` or ``"tpu"``);
      None for plain JAX implementations.
  """

  module: str
  function: str
  platform: str | None = None

  def load(self) -> Callable[..., Any]:
    """The function; a module that fails to import raises :class:`NotSupportedError`."""
    try:
      mod = importlib.import_module(self.module)
    except Exception as e:  # noqa: BLE001 - a kernel file that fails to import cannot serve
      raise NotSupportedError(f"cannot import {self.module}: {type(e).__name__}: {e}") from e
    return getattr(mod, self.function)


def implementations(package: str, function: str, names: Sequence[str]) -> dict[str, Implementation]:
  """The ``IMPLEMENTATIONS`` table of an op folder: ``package.<name>.function`` for each name.

  Modules named ``pallas_<platform>`` are Pallas kernels for that platform.
  """
  table = {}
  for name in names:
    platform = name.removeprefix("pallas_") if name.startswith("pallas_") else None
    table[name] = Implementation(f"{package}.{name}", function, platform)
  return table


# ---------------------------------------------------------------------------------------------
# The record of what served each op.

_lock = threading.Lock()
_served: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_refused: dict[str, dict[str, list[str]]] = collections.defaultdict(dict)
_logged: set[tuple[str, str, str]] = set()


def served() -> dict[str, dict[str, Any]]:
  """The process-wide record: op -> ``{"served": {name: calls}, "refused": {name: [reasons]}}``.

  Calls are counted when traced (a jitted step counts once per compilation).
  """
  with _lock:
    ops = sorted(set(_served) | set(_refused))
    return {
      op: {
        "served": dict(sorted(_served[op].items())),
        "refused": {name: list(r) for name, r in sorted(_refused[op].items())},
      }
      for op in ops
    }


def reset_served() -> None:
  """Clears the record (and the set of refusals already logged)."""
  with _lock:
    _served.clear()
    _refused.clear()
    _logged.clear()


def _note_refusal(op: str, name: str, reason: str, quiet: bool) -> None:
  with _lock:
    reasons = _refused[op].setdefault(name, [])
    if reason not in reasons:
      reasons.append(reason)
    first = (op, name, reason) not in _logged
    _logged.add((op, name, reason))
  if first and not quiet:
    log.warning("%s: implementation %r refused this call: %s", op, name, reason)


def note_served(op: str, name: str) -> None:
  """Adds one call of ``op`` served by ``name`` to the record (for ops that do not dispatch)."""
  with _lock:
    _served[op][name] += 1


# ---------------------------------------------------------------------------------------------
# FLOP marks: a model's FLOPs read from its jaxpr need each op's count, since a Pallas call's
# work is invisible to XLA's cost analysis and a blockwise XLA op's masked blocks are not work.

FLOPS_MARK = "ops_flops__"
_marking = threading.local()


@contextlib.contextmanager
def marking_flops():
  """While active, each dispatched call runs inside a ``jax.jit`` named
  ``ops_flops__<op>__<forward FLOPs>`` (see ``pipelines.bench.flops``)."""
  previous = getattr(_marking, "on", False)
  _marking.on = True
  try:
    yield
  finally:
    _marking.on = previous


def _marked(op: str, flops: Callable[..., float] | None, args, kwargs, run: Callable[[], Any]):
  if flops is None or not getattr(_marking, "on", False):
    return run()
  count = int(flops(*args, **kwargs))
  run.__name__ = f"{FLOPS_MARK}{op}__{count}"
  return jax.jit(run)()


# ---------------------------------------------------------------------------------------------
# Running one implementation.


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


def _split(args: tuple, kwargs: dict):
  """Flattens ``(args, kwargs)`` into traced arrays (operands) and everything else (static)."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  dynamic = [i for i, x in enumerate(leaves) if isinstance(x, jax.core.Tracer)]
  return leaves, treedef, dynamic


def _signature(leaves, treedef, dynamic) -> str:
  """A cache key of a call: its tree, traced shapes/dtypes and the static values."""
  parts = [str(treedef)]
  for i, x in enumerate(leaves):
    if i in dynamic or _is_array(x):
      parts.append(f"{tuple(x.shape)}:{x.dtype}")
    else:
      parts.append(repr(x))
  return "|".join(parts)


def _differentiable(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def _trial_lower(fn: Callable, args: tuple, kwargs: dict, platform: str, compile_: bool):
  """Lowers (and with ``compile_`` compiles) ``fn`` and its VJP for ``platform``.

  Traced arrays become abstract arguments; concrete values stay closed over, so the kernel
  sees the same static information as in the real call.
  """
  leaves, treedef, dynamic = _split(args, kwargs)
  abstract = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in dynamic]
  diff = [j for j, i in enumerate(dynamic) if _differentiable(leaves[i])]

  def call(*xs):
    full = list(leaves)
    for i, x in zip(dynamic, xs):
      full[i] = x
    a, kw = jax.tree.unflatten(treedef, full)
    return fn(*a, **kw)

  def forward_backward(*xs):
    def f(*d):
      ys = list(xs)
      for j, x in zip(diff, d):
        ys[j] = x
      return call(*ys)

    out, vjp = jax.vjp(f, *[xs[j] for j in diff])
    cts = jax.tree.map(
      lambda o: jnp.ones_like(o) if _differentiable(o) else np.zeros(o.shape, jax.dtypes.float0),
      out,
    )
    return out, vjp(cts)

  lowered = (
    jax.jit(forward_backward)
    .trace(*abstract)
    .lower(lowering_platforms=(_lowering_platform(platform),))
  )
  if compile_:
    lowered.compile()


_trials: dict[str, str | None] = {}


def _check_lowering(op: str, name: str, impl: Implementation, fn, args, kwargs):
  """Raises :class:`NotSupportedError` if the kernel fails to lower (or compile) for its platform.

  Runs only when the program is built for the kernel's platform (present or simulated); cached
  per call signature.
  """
  if impl.platform is None or backend() != impl.platform:
    return
  on_device = simulated_backend() is None
  leaves, treedef, dynamic = _split(args, kwargs)
  key = f"{op}|{name}|{on_device}|{_signature(leaves, treedef, dynamic)}"
  if key not in _trials:
    try:
      _trial_lower(
        functools.partial(fn, interpret=False), args, kwargs, impl.platform, compile_=on_device
      )
      _trials[key] = None
    except NotSupportedError as e:
      _trials[key] = str(e)
    except Exception as e:  # noqa: BLE001 - a lowering/compile failure of the kernel
      what = "compile" if on_device else "lower"
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      _trials[key] = (
        f"{FAILED}does not {what} for {impl.platform}: {type(e).__name__}: {first[:300]}"
      )
  if _trials[key] is not None:
    raise NotSupportedError(_trials[key])


def _run(impl: Implementation, fn: Callable, args, kwargs, interpret: Any):
  """Calls ``fn`` with ``interpret`` resolved (see the module docstring)."""
  if impl.platform is None:
    return fn(*args, interpret=False, **kwargs)
  if interpret is not None:
    return fn(*args, interpret=interpret, **kwargs)
  # Both branches are traced (so a refusal of the compiled kernel counts on every host); only
  # the branch of the platform being lowered for is lowered.
  return jax.lax.platform_dependent(
    cpu=lambda: fn(*args, interpret=True, **kwargs),
    default=lambda: fn(*args, interpret=False, **kwargs),
  )


def dispatch(
  op: str,
  implementations: Mapping[str, Implementation],
  implementation: str | Sequence[str] | None,
  defaults: Mapping[str, Sequence[str]],
  *args: Any,
  interpret: Any = None,
  flops: Callable[..., float] | None = None,
  **kwargs: Any,
) -> Any:
  """Runs ``op`` with the chosen implementation and records which one served.

  Args:
    op: name of the op, for messages and the record.
    implementations: the op's ``IMPLEMENTATIONS`` table.
    implementation: ``None`` (by backend), one name, or a sequence of names tried in order.
    defaults: backend (``"cpu"``, ``"gpu"``, ``"tpu"``) -> names to try in order.
    *args: passed through.
    interpret: None (follow the platform lowered for), True/False, or a Pallas interpret
      parameter object; plain JAX implementations ignore it.
    flops: ``(*args, **kwargs) -> forward FLOPs`` of the call, for :func:`marking_flops`.
    **kwargs: passed through.

  Raises:
    ValueError: an unknown implementation name.
    NotSupportedError: no chosen implementation can serve the call; the message lists each
      implementation's reason.
  """
  if implementation is None:
    names = tuple(defaults.get(backend(), defaults.get("cpu", ("xla",))))
  elif isinstance(implementation, str):
    names = (implementation,)
  else:
    names = tuple(implementation)
    if not names:
      raise ValueError(f"{op}: implementation=() names no implementation")
  for name in names:
    if name not in implementations:
      raise ValueError(
        f"{op}: unknown implementation {name!r}; choose from {sorted(implementations)}"
      )
  single = isinstance(implementation, str)
  failures = []
  for name in names:
    impl = implementations[name]
    try:
      fn = impl.load()
      if interpret is None:
        _check_lowering(op, name, impl, fn, args, kwargs)
      run = lambda impl=impl, fn=fn: _run(impl, fn, args, kwargs, interpret)
      out = _marked(op, flops, args, kwargs, run)
    except NotSupportedError as e:
      if single:
        raise NotSupportedError(f"{op}: implementation {name!r} cannot serve this call: {e}") from e
      reason = str(e)
    except Exception as e:  # a kernel's tracing failure is a refusal; plain JAX errors are bugs
      if single or impl.platform is None:
        raise
      reason = f"{FAILED}{type(e).__name__}: {str(e).strip()[:300]}"
    else:
      note_served(op, name)
      return out
    _note_refusal(op, name, reason, quiet=name == names[-1])
    failures.append(f"{name}: {reason}")
  raise NotSupportedError(
    f"{op}: no implementation could serve this call:\n  " + "\n  ".join(failures)
  )
