"""Public entry points: ``gated_delta_rule`` (a sequence) and ``gated_delta_rule_step`` (decode).

Validation, padding to a chunk multiple, the prefix (JRT-RNN) mode and the choice of
implementation live here; the implementations share the signature
``chunk_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, chunk_size, interpret)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ops.common.dispatch import Implementation, dispatch, implementations
from ops.memory.gated_delta import reference

# Decoding calls this once per token: one compiled program instead of op-by-op dispatch.
_step = jax.jit(reference.recurrent_step, static_argnames=("scale",))

# Each function takes ``(q, k, v, g, beta, *, scale, initial_state, chunk_size, interpret,
# segment_ids=None) -> (o, final_state)``; one that cannot reset at segments refuses them.
IMPLEMENTATIONS = {
  **implementations(
    "ops.memory.gated_delta", "chunk_gated_delta_rule", ("xla", "pallas_tpu", "pallas_gpu")
  ),
  "reference": Implementation("ops.memory.gated_delta.reference", "recurrent_gated_delta_rule"),
  "reference_chunked": Implementation("ops.memory.gated_delta.reference", "chunk_gated_delta_rule"),
}
DEFAULTS = {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")}


def _concrete(x):
  """The value of ``x`` as numpy, or None under tracing."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except Exception:  # noqa: BLE001 - any non-concrete array (e.g. a sharded abstract value)
    return None


def _check_gates(g, beta, B, T, H, K):
  if g is not None:
    if g.shape not in ((B, T, H), (B, T, H, K)):
      raise ValueError(f"g must be [B,T,H]={(B, T, H)} or [B,T,H,K]={(B, T, H, K)}, got {g.shape}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
      raise ValueError(f"g must be floating point, got {g.dtype}")
    gv = _concrete(g)
    if gv is not None and np.any(gv > 0):
      raise ValueError(f"g is a log decay and must be <= 0; max is {float(np.max(gv))}")
  if beta is not None:
    if beta.shape != (B, T, H):
      raise ValueError(f"beta must be [B,T,H]={(B, T, H)}, got {beta.shape}")
    if not jnp.issubdtype(beta.dtype, jnp.floating):
      raise ValueError(f"beta must be floating point, got {beta.dtype}")
    bv = _concrete(beta)
    if bv is not None and (np.any(bv < 0) or np.any(bv > 1)):
      raise ValueError(
        f"beta must lie in [0, 1]; got range [{float(np.min(bv))}, {float(np.max(bv))}]"
      )


def _check_qkv(q, k, v, *, time_axis: bool):
  want = 4 if time_axis else 3
  names = "[B,T,H,K]" if time_axis else "[B,H,K]"
  if q.ndim != want or k.ndim != want or v.ndim != want:
    raise ValueError(
      f"q, k must be {names} and v {names[:-2]}V]; got ranks {q.ndim}, {k.ndim}, {v.ndim}"
    )
  if k.shape != q.shape:
    raise ValueError(f"k must have q's shape {q.shape}, got {k.shape}")
  if v.shape[:-1] != q.shape[:-1]:
    raise ValueError(f"v must be {q.shape[:-1]} + (V,), got {v.shape}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _check_state(state, B, H, K, V, name):
  if state is not None and state.shape != (B, H, K, V):
    raise ValueError(f"{name} must be [B,H,K,V]={(B, H, K, V)}, got {state.shape}")


def check_inputs(q, k, v, g, beta, initial_state):
  """Validates the sequence inputs of :func:`gated_delta_rule` (shared with the
  context-parallel form).

  Returns:
    ``(B, T, H, K, V)``.

  Raises:
    ValueError: bad shapes or dtypes, ``g > 0`` or ``beta`` outside [0, 1] (when concrete).
  """
  _check_qkv(q, k, v, time_axis=True)
  B, T, H, K = q.shape
  V = v.shape[-1]
  _check_gates(g, beta, B, T, H, K)
  _check_state(initial_state, B, H, K, V, "initial_state")
  return B, T, H, K, V


def _pad_time(x, pad, mode="constant"):
  if x is None or pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, mode=mode)


def gated_delta_rule(
  q,
  k,
  v,
  *,
  g=None,
  beta=None,
  scale: float | None = None,
  initial_state=None,
  output_final_state: bool = False,
  chunk_size: int = 64,
  segment_ids=None,
  prefix_len: int | None = None,
  implementation=None,
  interpret: bool | None = None,
):
  """Gated delta rule over a sequence (linear attention, GLA, RetNet, SSD, (gated) DeltaNet).

  Per token, with ``D_t = diag(exp(g_t))``: ``S' = D_t S_{t-1}``; additive write
  ``S_t = S' + k_t v_t^T`` (``beta=None``) or delta write
  ``S_t = S' + beta_t k_t (v_t - S'^T k_t)^T``; output ``o_t = scale * S_t^T q_t``.

  Args:
    q: ``[B,T,H,K]`` queries.
    k: ``[B,T,H,K]`` keys.
    v: ``[B,T,H,V]`` values.
    g: ``None`` (no decay), ``[B,T,H]`` (per head) or ``[B,T,H,K]`` (per key channel) log
      decay, <= 0; computed in float32.
    beta: ``None`` (additive write) or ``[B,T,H]`` delta-rule write strength in [0, 1].
    scale: output scale, default ``K**-0.5``.
    initial_state: ``None`` (zeros) or ``[B,H,K,V]``, used in float32.
    output_final_state: return the state after the last token (else None).
    chunk_size: ``C``, a power of two; T need not be a multiple of it.
    segment_ids: optional ``[B,T]`` int ids of packed sequences; the state is zeroed at each
      segment start (token 0 keeps ``initial_state``), so packed segments equal separate calls.
    prefix_len: JRT-RNN prefix mode (additive writes only): tokens ``t < prefix_len`` read the
      state after the whole prefix, ``S_{prefix_len-1}``; later tokens are causal as usual.
    implementation: ``None`` (by backend, ``DEFAULTS``: the platform's Pallas kernel then
      ``xla``; each refusal is logged), ``"xla"``, ``"pallas_tpu"``, ``"pallas_gpu"``,
      ``"reference"``, ``"reference_chunked"`` (a name never falls back), or a sequence tried
      in order.
    interpret: run Pallas kernels in interpret mode (``None``: only when lowering for CPU).

  Returns:
    ``(o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32 or None)``.

  Raises:
    ValueError: bad shapes or dtypes, ``g > 0`` or ``beta`` outside [0, 1] (checked when
      concrete), ``chunk_size`` not a power of two, or an ill-defined prefix request.
    NotSupportedError: the chosen implementation cannot serve the call.
  """
  B, T, H, K, V = check_inputs(q, k, v, g, beta, initial_state)
  if not isinstance(chunk_size, int) or chunk_size < 1 or chunk_size & (chunk_size - 1):
    raise ValueError(f"chunk_size must be a power of two, got {chunk_size!r}")
  if segment_ids is not None:
    if segment_ids.shape != (B, T) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be int [B,T]={(B, T)}, got {segment_ids.shape}")
  if scale is None:
    scale = K**-0.5
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  g, beta, initial_state = f32(g), f32(beta), f32(initial_state)

  run = lambda *xs, state: _run_chunked(
    *xs,
    scale=float(scale),
    initial_state=state,
    chunk_size=chunk_size,
    implementation=implementation,
    interpret=interpret,
  )
  if prefix_len is not None and prefix_len != 0:
    if not isinstance(prefix_len, (int, np.integer)) or not 0 <= prefix_len <= T:
      raise ValueError(f"prefix_len must be an int in [0, T={T}], got {prefix_len!r}")
    if beta is not None:
      raise ValueError(
        "prefix_len is defined for additive writes only (beta=None): a delta write's state "
        "depends on the order of the prefix tokens, so there is no non-causal prefix"
      )
    if segment_ids is not None:
      raise ValueError("prefix_len and segment_ids cannot be combined")
    P = int(prefix_len)
    head = lambda x: None if x is None else x[:, :P]
    tail = lambda x: None if x is None else x[:, P:]
    _, prefix_state = run(head(q), head(k), head(v), head(g), None, None, state=initial_state)
    o_prefix = scale * jnp.einsum("bthk,bhkv->bthv", q[:, :P].astype(jnp.float32), prefix_state)
    o_prefix = o_prefix.astype(v.dtype)
    if P == T:
      return o_prefix, prefix_state if output_final_state else None
    o_rest, state = run(tail(q), tail(k), tail(v), tail(g), None, None, state=prefix_state)
    return jnp.concatenate([o_prefix, o_rest], axis=1), state if output_final_state else None

  o, state = run(q, k, v, g, beta, segment_ids, state=initial_state)
  return o, state if output_final_state else None


def _run_chunked(
  q, k, v, g, beta, segment_ids, *, scale, initial_state, chunk_size, implementation, interpret
):
  """Pads T to a chunk multiple (k=v=g=beta=0 leave the state unchanged) and dispatches."""
  T = q.shape[1]
  pad = -T % chunk_size
  q, k, v, g, beta = (_pad_time(x, pad) for x in (q, k, v, g, beta))
  segment_ids = _pad_time(segment_ids, pad, mode="edge")
  kwargs = dict(scale=scale, initial_state=initial_state, chunk_size=chunk_size)
  if segment_ids is not None:
    kwargs["segment_ids"] = segment_ids
  o, state = dispatch(
    "gated_delta_rule",
    IMPLEMENTATIONS,
    implementation,
    DEFAULTS,
    q,
    k,
    v,
    g,
    beta,
    interpret=interpret,
    flops=forward_flops,
    **kwargs,
  )
  return o[:, :T], state


def forward_flops(q, k, v, g, beta, *, chunk_size, **_) -> float:
  """Matmul FLOPs of the chunked forward (per token, chunk ``C``).

  ``q k^T`` and ``k k^T`` (``4 C K``), the triangular solve applied to ``[K | V]``
  (``2 C (K + V)``, delta rule only), the intra-chunk read (``2 C V``) and the three state
  products ``S^T q``, ``S^T w`` and ``k^T u`` (``6 K V``).
  """
  b, t, h, kd = q.shape
  vd, c = v.shape[-1], chunk_size
  per_token = 4 * c * kd + 2 * c * vd + 6 * kd * vd
  if beta is not None:
    per_token += 2 * c * (kd + vd)
  return float(b * t * h * per_token)


def gated_delta_rule_step(q, k, v, *, g=None, beta=None, scale: float | None = None, state):
  """One decoding step of :func:`gated_delta_rule`.

  Args:
    q: ``[B,H,K]``.
    k: ``[B,H,K]``.
    v: ``[B,H,V]``.
    g: ``None``, ``[B,H]`` or ``[B,H,K]`` log decay (<= 0).
    beta: ``None`` or ``[B,H]`` in [0, 1].
    scale: output scale, default ``K**-0.5``.
    state: ``[B,H,K,V]`` state after the previous token.

  Returns:
    ``(o [B,H,V] in v.dtype, state [B,H,K,V] float32)``.
  """
  _check_qkv(q, k, v, time_axis=False)
  B, H, K = q.shape
  V = v.shape[-1]
  # Reuse the sequence checks with a time axis of length 1.
  add_t = lambda x: None if x is None else x[:, None]
  _check_gates(add_t(g), add_t(beta), B, 1, H, K)
  if state is None:
    raise ValueError("state is required ([B,H,K,V]; zeros for the first token)")
  _check_state(state, B, H, K, V, "state")
  if scale is None:
    scale = K**-0.5
  o, state = _step(state.astype(jnp.float32), q, k, v, g, beta, scale=float(scale))
  return o.astype(v.dtype), state
