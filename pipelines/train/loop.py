"""``memzoo train``: one readable loop from config to checkpoints.

The model is split once into a graph definition and its parameters; the train step is a plain
``jax.jit`` function of (params, optimizer state, batch). Read it top to bottom in ``train``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import ops.common
import zoo
from pipelines import config as config_lib
from pipelines import rundir, sharding
from pipelines.data import loader
from pipelines.data.hf_tokenizer import load_tokenizer
from pipelines.errors import NonFiniteLossError
from pipelines.run import build_model
from pipelines.train.checkpoint import Checkpointer, abstract
from pipelines.train.metrics import MetricsWriter
from pipelines.train.optim import optimizer, schedule
from zoo.layers import remat

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
  step: int
  params: Any
  graphdef: Any
  history: list[dict[str, Any]]
  run_dir: Path


def loss_fn(graphdef, params, rest, batch):
  """Mean next-token cross-entropy over ``loss_mask``; returns (loss, (sum_nats, count))."""
  model = nnx.merge(graphdef, params, rest)
  if "positions" in batch:
    # Synthesized position ids (``data.position_factor``; only families that take them).
    logits, _ = model(
      batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"]
    )
  elif model.accepts_segment_ids:
    logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"])
  else:
    # Families defined on one stream (no memory reset at document starts) are fed one
    # document per row by the loader (``PackedSequences(single_stream=True)``).
    logits, _ = model(batch["inputs"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["loss_mask"]
  total = jnp.sum(nll * mask)
  count = jnp.sum(mask)
  return total / jnp.maximum(count, 1.0), (total, count)


def make_train_step(
  graphdef,
  rest,
  tx: optax.GradientTransformation,
  cfg: config_lib.TrainConfig,
  mesh: jax.sharding.Mesh | None = None,
):
  """A jitted ``(params, opt_state, batch) -> (params, opt_state, metrics)``.

  With ``grad_accum > 1`` the batch is split into micro-batches whose gradients are averaged
  (weighted by their token counts) in a ``lax.scan``: one optimizer update per step. With a
  ``mesh`` the step runs under it: the layers constrain activations by the layout's rules and,
  on a ``context`` axis, run ring attention and the sequence-parallel memory.
  """
  grad_fn = jax.value_and_grad(lambda p, b: loss_fn(graphdef, p, rest, b)[1][0], has_aux=False)

  def micro(params, batch):
    total, grads = grad_fn(params, batch)
    return total, jnp.sum(batch["loss_mask"]), grads

  def step(params, opt_state, batch):
    if cfg.grad_accum == 1:
      total, count, grads = micro(params, batch)
    else:
      split = jax.tree.map(
        lambda x: x.reshape(cfg.grad_accum, x.shape[0] // cfg.grad_accum, *x.shape[1:]), batch
      )

      def body(carry, mb):
        t, c, g = micro(params, mb)
        return jax.tree.map(jnp.add, carry, (t, c, g)), None

      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
      (total, count, grads), _ = jax.lax.scan(body, zeros, split)
    count = jnp.maximum(count, 1.0)
    loss = total / count
    grads = jax.tree.map(lambda g: g / count, grads)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # Finite loss and gradients are not enough: a huge learning rate turns a finite gradient
    # into an inf/NaN update, so the new parameters and optimizer state are checked too.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((new_params, new_opt_state))
    # A non-finite step never changes the state (the host then stops or skips, by config).
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params = keep(new_params, params)
    opt_state = keep(new_opt_state, opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tokens": count}
    return params, opt_state, metrics

  options = remat.compiler_options(cfg.remat_policy) or None
  return sharding.in_mesh(jax.jit(step, donate_argnums=(0, 1), compiler_options=options), mesh)


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_eval_step(graphdef, rest, mesh: jax.sharding.Mesh | None = None):
  @jax.jit
  def step(params, batch):
    _, (total, count) = loss_fn(graphdef, params, rest, batch)
    return total, count

  return sharding.in_mesh(step, mesh)


def evaluate_loss(
  eval_step, params, batches, to_device=lambda b: b, token_bytes: np.ndarray | None = None
) -> dict[str, float]:
  """Held-out loss (nats/token) and bits per byte over fixed batches.

  ``token_bytes [V]``: UTF-8 bytes per id (the tokenizer's); default the byte tokenizer's.
  """
  total = count = nbytes = 0.0
  for b in batches:
    t, c = eval_step(params, to_device(b))
    total += float(t)
    count += float(c)
    if token_bytes is None:
      nbytes += float(np.sum((b["loss_mask"] > 0) & (b["targets"] < 256)))
    else:
      nbytes += float(np.sum((b["loss_mask"] > 0) * token_bytes[b["targets"]]))
  loss = total / max(count, 1.0)
  return {"loss": loss, "bits_per_byte": total / math.log(2) / max(nbytes, 1.0)}


IMPLEMENTATIONS_FILE = "implementations.json"


def write_implementations(run_dir: Path) -> None:
  """Writes which implementation served each op (and what refused) to the run directory."""
  if jax.process_index() == 0:
    record = {"backend": ops.common.backend(), "ops": ops.common.served()}
    (Path(run_dir) / IMPLEMENTATIONS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def train(
  exp: config_lib.Experiment,
  *,
  on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
  """Trains ``exp`` in ``exp.run_dir``, resuming from its newest checkpoint if there is one.

  Args:
    exp: the validated experiment.
    on_step: called after every step with (step, metrics) on the host; tests use it to
      interrupt a run.

  Raises:
    rundir.RunDirError: the run directory cannot be created or written.
    rundir.RunLockedError: another live ``memzoo train`` holds the run directory.
  """
  run_dir = rundir.prepare(exp.run_dir)
  lock = _lock_run(run_dir)
  try:
    return _train(exp, run_dir, on_step)
  finally:
    if lock is not None:
      lock.release()


def _lock_run(run_dir: Path) -> rundir.RunLock | None:
  """Process 0 locks the run directory before anything in it is written; in a multi-host run
  every process learns whether it did, so all stop together."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = rundir.RunLock(run_dir).acquire()
    except rundir.RunLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = rundir.RunLockedError(
        f"run directory {str(run_dir)!r} is in use by another run (process 0 could not lock it)"
      )
  if error is not None:
    raise error
  return lock


def _train(exp: config_lib.Experiment, run_dir: Path, on_step) -> TrainResult:
  cfg = exp.train
  primary = jax.process_index() == 0
  if primary:
    config_lib.dump(exp, run_dir / "config.yaml")

  # Data: the corpus manifest is part of the run's record.
  tok = load_tokenizer(exp)
  # Families without a memory reset at document starts get one document per row.
  single_stream = not zoo.model_class(exp.model.family).accepts_segment_ids
  data = loader.build(
    exp.data, vocab_size=exp.model.vocab_size, tokenizer=tok, single_stream=single_stream
  )
  if primary:
    rundir.atomic_write_text(run_dir / "data.json", json.dumps(data.manifest, indent=2))

  # Model, optimizer and mesh.
  mesh = sharding.make_mesh(exp.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  plan = config_lib.stage_plan(exp)
  planned = sum(st.steps for st in cfg.stages)
  if cfg.stages and planned != cfg.steps:
    log.warning(
      "train.steps=%d but the stages add up to %d: %s",
      cfg.steps,
      planned,
      "the run ends inside a stage" if cfg.steps < planned else "the last stage runs longer",
    )
  for st in plan:
    if (st.exp.data.batch_size // cfg.grad_accum) % shards:
      raise config_lib.ConfigError(
        f"{exp.source}: data.batch_size={st.exp.data.batch_size} / train.grad_accum="
        f"{cfg.grad_accum} must be divisible by the mesh's data x fsdp = {shards} devices "
        "(set mesh.data)"
      )
  # Parameters are created already sharded: no device ever holds the whole model. Stages
  # differ only in settings outside the parameters (RoPE base/scaling), so the parameters
  # and optimizer state carry over from one stage to the next.
  graphdef, params, rest = sharding.create_sharded(
    lambda: build_model(plan[0].exp, cfg.compute_dtype, cfg.remat_policy), mesh
  )
  tx = optimizer(cfg)
  opt_state = sharding.place_state(tx.init(params), mesh)
  put = lambda b: sharding.shard_batch(b, mesh)

  # Resume: parameters, optimizer and data iterator come back together.
  ckpt = Checkpointer(run_dir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
  start, data_state = 0, None
  if ckpt.latest_step() is not None:
    # A step that fails its checksums or holds NaN is moved aside (this run holds the lock), so
    # the run goes on from the previous one and can save that step number again. An imported
    # run's step 0 holds parameters only: its optimizer state starts fresh here.
    target = {"params": params, "opt": opt_state} if ckpt.has_optimizer() else {"params": params}
    restored = ckpt.restore(abstract(target), set_aside=True)
    if restored is None:
      log.warning("no intact checkpoint left in %s; training from step 0", ckpt.directory)
    else:
      start, state, data_state, _ = restored
      params = state["params"]
      if "opt" in state:
        opt_state = sharding.place_state(state["opt"], mesh)

  def enter(stage: config_lib.Stage, saved: dict | None):
    """The step functions, data iterator and held-out batches of ``stage``; ``saved``: the
    checkpoint's data state (used when it belongs to this stage)."""
    sexp = stage.exp
    if stage.index == plan[0].index:
      g, r = graphdef, rest
    else:
      # A new RoPE base/scaling is a new graph definition; fresh parameters are dropped.
      g, _, r = sharding.create_sharded(
        lambda: build_model(sexp, cfg.compute_dtype, cfg.remat_policy), mesh
      )
    iterator = iter(
      loader.mixture_dataset(
        sexp.data, data, sexp.model.vocab_size, stage_seed(exp.seed, stage.index), single_stream
      )
    )
    state = _stage_state(saved, stage.index)
    if state is not None:
      iterator.set_state(state)
    held = loader.heldout_batches(
      loader.with_seq_len(data.heldout, sexp.data.seq_len),
      sexp.data.batch_size,
      max(cfg.eval_batches, 1),
    )
    return g, make_train_step(g, r, tx, cfg, mesh), make_eval_step(g, r, mesh), iterator, held

  stage = config_lib.stage_at(plan, start + 1)
  stage_graphdef, train_step, eval_step, it, heldout = enter(stage, data_state)
  stages_record = _StagesRecord(run_dir, plan, primary)
  if start < cfg.steps:
    stages_record.entered(stage, start + 1, resumed=start > 0)
  # Every process sees the same (global) metrics; one writes them.
  if primary:
    metrics_out = MetricsWriter(run_dir, resume_step=start)
  else:
    metrics_out = _NoMetrics()

  lr_at = schedule(cfg)
  history: list[dict[str, Any]] = []
  bar = tqdm(
    total=cfg.steps,
    initial=start,
    desc=f"train {exp.model.family}",
    disable=not cfg.progress,
    dynamic_ncols=True,
  )
  # Token and skip counts stay on device between log steps: no host sync per step. Only
  # on_nonfinite=stop reads the finite flag every step, to stop at the step that failed.
  last_time, last_tokens, skipped = time.perf_counter(), jnp.zeros(()), jnp.zeros((), jnp.int32)
  # The ops record what served them while the steps are traced.
  ops.common.reset_served()
  try:
    for step in range(start + 1, cfg.steps + 1):
      if step > stage.end:
        # A stage switch: new length/batch/mixture and RoPE settings; same parameters.
        stage = config_lib.stage_at(plan, step)
        stage_graphdef, train_step, eval_step, it, heldout = enter(stage, None)
        stages_record.entered(stage, step, resumed=False)
      batch = next(it)
      params, opt_state, m = train_step(params, opt_state, put(batch))
      if step == start + 1:
        write_implementations(run_dir)
      if cfg.on_nonfinite == "stop" and not bool(m["finite"]):
        raise NonFiniteLossError(
          f"non-finite loss, gradient or update at step {step} (loss={float(m['loss'])}, "
          f"grad_norm={float(m['grad_norm'])}); stopping without checkpointing it (saved steps "
          "hold finite parameters). Lower train.lr, or set train.on_nonfinite=skip to drop "
          "such steps."
        )
      skipped = skipped + (~m["finite"]).astype(jnp.int32)
      last_tokens = last_tokens + m["tokens"]
      record = None
      if step % cfg.log_every == 0 or step == cfg.steps:
        now = time.perf_counter()
        record = {
          "loss": float(m["loss"]),
          "grad_norm": float(m["grad_norm"]),
          "lr": float(lr_at(step - 1)),
          "tokens_per_s": float(last_tokens) / max(now - last_time, 1e-9),
          "skipped_steps": int(skipped),
        }
        if len(plan) > 1:
          record.update(stage=stage.index, seq_len=stage.exp.data.seq_len)
        last_time, last_tokens = now, jnp.zeros(())
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
      if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
        ev = evaluate_loss(
          eval_step, params, heldout[: cfg.eval_batches or 1], put, tok.token_bytes()
        )
        record = {
          **(record or {}),
          "eval_loss": ev["loss"],
          "eval_bits_per_byte": ev["bits_per_byte"],
        }
      if record is not None:
        metrics_out.write(step, **record)
        history.append({"step": step, **record})
      if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        ckpt.save(
          step,
          {"params": params, "opt": opt_state},
          {"stage": stage.index, "iterator": it.get_state()},
          {"step": step, "model": exp.model.family},
        )
      ckpt.poll()
      bar.update(1)
      if on_step is not None:
        on_step(step, {"loss": float(m["loss"])})
  finally:
    bar.close()
    ckpt.close()
    metrics_out.close()
  write_implementations(run_dir)  # now with the evaluation step's ops too
  return TrainResult(cfg.steps, params, stage_graphdef, history, run_dir)


def stage_seed(seed: int, index: int) -> int:
  """The data seed of stage ``index`` (stage 0 reads the run seed's order)."""
  return seed if index == 0 else int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _stage_state(saved: dict | None, index: int) -> dict | None:
  """The iterator state of stage ``index`` from a checkpoint's data state, or None (the stage
  starts fresh). Checkpoints written before curricula hold the stage-0 state itself."""
  if not saved:
    return None
  if "iterator" not in saved:
    return saved if index == 0 else None
  return saved["iterator"] if saved.get("stage") == index else None


STAGES_FILE = "stages.json"


class _StagesRecord:
  """``stages.json``: the run's stage plan and, for each time a stage began (or a resumed run
  went on inside it), the step and wall time."""

  def __init__(self, run_dir: Path, plan: list[config_lib.Stage], primary: bool):
    self.path = Path(run_dir) / STAGES_FILE
    self.primary = primary
    events = []
    if primary and self.path.is_file():
      try:
        events = json.loads(self.path.read_text()).get("events", [])
      except (OSError, ValueError):
        events = []
    self.body = {"stages": [st.record() for st in plan], "events": events}

  def entered(self, stage: config_lib.Stage, step: int, resumed: bool) -> None:
    event = {"stage": stage.index, "name": stage.name, "step": step, "resumed": resumed}
    log.info("stage %d (%s) from step %d", stage.index, stage.name, step)
    self.body["events"].append({**event, "time": time.time()})
    if self.primary:
      rundir.atomic_write_text(self.path, json.dumps(self.body, indent=2) + "\n")


class _NoMetrics:
  """The metrics writer of non-primary processes in a multi-host run."""

  def write(self, step: int, **values: Any) -> None:
    pass

  def close(self) -> None:
    pass
