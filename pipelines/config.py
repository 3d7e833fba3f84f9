"""Experiment configs: YAML files validated into typed dataclasses before any compute.

An experiment has five sections, ``model``, ``data``, ``train``, ``eval`` and ``mesh``, plus
``run_dir`` and ``seed``. ``model`` names a family and a preset, and any other key overrides a
field of that family's config. ``key=value`` overrides on the command line use dotted paths
(``train.steps=60``, ``model.d_model=64``); values are parsed as YAML scalars. Loading uses
``yaml.safe_load`` only, so a config never executes code.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

import zoo
from pipelines.errors import ConfigError, InputError
from zoo.configbase import closest, config_dataclass, field_names
from zoo.layers.rope import RopeScaling

TaskArg = int | float | str | bool | tuple[int, ...] | tuple[float, ...]


@config_dataclass
class SourceConfig:
  """One source of a data mixture (``data.mixture``); see ``pipelines.data.mixture``.

  Attributes:
    kind: ``corpus`` (the documents of ``data.source``/``data.paths``, the held-out split left
      out), ``text`` or ``jsonl`` (their own ``paths``), or ``task`` (a synthetic task stream
      of ``pipelines.tasks``, one example per row).
    weight: relative share of the mixture's rows (normalised over the sources).
    name: a label for the run record (default: the kind and index).
    paths, jsonl_field: the files of a ``text``/``jsonl`` source.
    min_tokens, max_tokens: keep only documents of ``min_tokens <= tokens < max_tokens``
      (0 = no bound): the corpus split by document length into long and short.
    task, task_args: the task name (``memzoo`` task registry) and its parameters (``length`` is
      the row length and is set by the loader).
  """

  kind: Literal["corpus", "text", "jsonl", "task"] = "corpus"
  weight: float = 1.0
  name: str = ""
  paths: tuple[str, ...] = ()
  jsonl_field: str = "text"
  min_tokens: int = 0
  max_tokens: int = 0
  task: str = ""
  task_args: dict[str, TaskArg] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not (math.isfinite(self.weight) and self.weight > 0):
      raise InputError(f"mixture weight must be > 0, got {self.weight}")
    if self.min_tokens < 0 or self.max_tokens < 0:
      raise InputError("mixture min_tokens and max_tokens must be >= 0 (0 = no bound)")
    if self.max_tokens and self.max_tokens <= self.min_tokens:
      raise InputError(
        f"mixture max_tokens={self.max_tokens} must be above min_tokens={self.min_tokens}"
      )
    if self.kind in ("text", "jsonl") and not self.paths:
      raise InputError(f"mixture source kind={self.kind!r} needs paths")
    if self.kind == "task" and not self.task:
      raise InputError("mixture source kind='task' needs task (a task name, e.g. mqar)")
    if self.kind != "task" and (self.task or self.task_args):
      raise InputError(f"task/task_args only apply to kind='task', not {self.kind!r}")
    if "length" in self.task_args or "seed" in self.task_args:
      raise InputError("task_args: length and seed are set by the loader (seq_len, run seed)")

  @property
  def label(self) -> str:
    return self.name or (self.task if self.kind == "task" else self.kind)


@config_dataclass
class DataConfig:
  """Where training text comes from and how it is cut.

  Attributes:
    source: ``stdlib`` (the running Python's standard library sources, no download), ``text``
      (local ``.txt``/``.py``/``.md`` files or folders), or ``jsonl`` (one JSON object per line).
    paths: files or folders for ``text`` / ``jsonl``.
    jsonl_field: the text field of each JSONL record.
    seq_len: tokens per training sequence.
    batch_size: sequences per optimizer step (global).
    heldout_fraction: fraction of documents kept out of training, chosen by hash of the path.
    max_documents: cap on documents read (0 = all).
    num_workers: grain worker processes (0 = in-process).
    tokenizer: ``byte`` (the built-in byte-level tokenizer) or a path to a ``tokenizer.json``,
      ``tokenizer.model`` or a directory holding one, relative to the run directory unless
      absolute (``memzoo import-hf`` sets it to the model's own); see
      ``pipelines.data.hf_tokenizer``.
    mixture: training sources with weights (:class:`SourceConfig`), mixed deterministically
      from the seed; empty = ``source`` alone. Held-out data always comes from ``source``.
    position_factor: position synthesis: rows of ``seq_len`` tokens get position ids spread
      over ``position_factor * seq_len`` (1 = natural positions); see
      ``pipelines.data.mixture.synthesize_positions``.
    position_chunks: contiguous chunks per document whose positions keep distance 1 (gaps
      are drawn between chunks).
  """

  source: Literal["stdlib", "text", "jsonl"] = "stdlib"
  paths: tuple[str, ...] = ()
  jsonl_field: str = "text"
  seq_len: int = 256
  batch_size: int = 16
  heldout_fraction: float = 0.02
  max_documents: int = 0
  num_workers: int = 0
  tokenizer: str = "byte"
  mixture: tuple[SourceConfig, ...] = ()
  position_factor: float = 1.0
  position_chunks: int = 2

  def __post_init__(self):
    if not (math.isfinite(self.position_factor) and self.position_factor >= 1.0):
      raise InputError(f"position_factor must be >= 1 (1 = off), got {self.position_factor}")
    if self.position_chunks < 1:
      raise InputError(f"position_chunks must be >= 1, got {self.position_chunks}")
    if not self.tokenizer:
      raise InputError("tokenizer must be 'byte' or a path to a tokenizer file")
    if self.seq_len < 2:
      raise InputError(f"seq_len must be >= 2, got {self.seq_len}")
    if self.batch_size < 1:
      raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise InputError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
    if self.source != "stdlib" and not self.paths:
      raise InputError(f"source={self.source!r} needs paths")


@config_dataclass
class StageConfig:
  """One stage of a curriculum (``train.stages``): its length in steps and what changes.

  Unset fields (None) take the experiment's own value (``data.*``, ``model.rope_*``), so a
  stage's settings never depend on the stage before it (resume can rebuild any stage alone).

  Attributes:
    steps: optimizer steps in this stage (``train.steps`` is the run's length: a shorter run
      ends inside a stage, a longer one continues the last stage; see :func:`stage_plan`).
    name: a label for the run record (default ``stage<i>``).
    seq_len, batch_size: the stage's rows and rows per step (a new length recompiles the step).
    mixture: the stage's ``data.mixture``.
    position_factor: the stage's ``data.position_factor``.
    rope_theta: the RoPE base of this stage (adjusted base frequency, ABF).
    rope_scaling: the RoPE scaling of this stage (``linear`` for position interpolation,
      ``yarn``, ...; see ``zoo.layers.rope.RopeScaling``).
  """

  steps: int
  name: str = ""
  seq_len: int | None = None
  batch_size: int | None = None
  mixture: tuple[SourceConfig, ...] | None = None
  position_factor: float | None = None
  rope_theta: float | None = None
  rope_scaling: RopeScaling | None = None

  def __post_init__(self):
    if self.steps < 1:
      raise InputError(f"a stage needs steps >= 1, got {self.steps}")
    if self.rope_theta is not None and not (math.isfinite(self.rope_theta) and self.rope_theta > 1):
      raise InputError(f"stage rope_theta must be > 1, got {self.rope_theta}")


@config_dataclass
class TrainConfig:
  """The optimisation loop.

  Attributes:
    steps: total optimizer steps.
    lr: peak learning rate; warmup_steps of linear warmup then cosine decay to lr * min_lr_ratio.
    grad_accum: micro-batches per step (batch_size must be divisible by it).
    compute_dtype: activations dtype (parameters and optimizer state stay float32).
    remat: per-block rematerialisation: ``none``/false, ``full``/true (save nothing in a block),
      ``dots`` (save matmul results) or ``offload`` (``dots`` saved to host memory; GPU/TPU).
    on_nonfinite: ``stop`` (raise, no checkpoint) or ``skip`` (drop the update).
    checkpoint_every / keep_checkpoints: Orbax checkpoint cadence and retention.
    log_every / eval_every / eval_batches: metrics cadence and held-out batches per eval.
    stages: a curriculum (:class:`StageConfig`), switched inside one run at the right step;
      empty = one stage of ``steps`` with the experiment's data and model settings.
  """

  steps: int = 200
  lr: float = 3e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  grad_accum: int = 1
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  remat: bool | Literal["none", "full", "dots", "offload"] = False
  on_nonfinite: Literal["stop", "skip"] = "stop"
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 4
  progress: bool = True
  stages: tuple[StageConfig, ...] = ()

  @property
  def remat_policy(self) -> str | None:
    """The ``zoo.layers.remat`` policy name, or None."""
    if self.remat is True:
      return "full"
    return None if self.remat in (False, "none") else self.remat

  def __post_init__(self):
    for name in ("steps", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
      if getattr(self, name) < 1:
        raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
    # .nan compares False with everything, so it would pass every range check below.
    for name in ("lr", "min_lr_ratio", "weight_decay", "b1", "b2", "grad_clip"):
      if not math.isfinite(getattr(self, name)):
        raise InputError(f"{name} must be a finite number, got {getattr(self, name)}")
    if self.lr <= 0:
      raise InputError(f"lr must be > 0, got {self.lr}")
    if self.warmup_steps < 0 or self.eval_every < 0 or self.eval_batches < 0:
      raise InputError("warmup_steps, eval_every and eval_batches must be >= 0")


@config_dataclass
class EvalConfig:
  """Evaluation after training (``memzoo eval`` and the demo report).

  Attributes:
    batches: held-out batches for loss / bits-per-byte.
    sample_tokens: tokens sampled for the report (0 = none).
    sample_prompt: the prompt for sampling.
    temperature: sampling temperature (0 = greedy).
  """

  batches: int = 16
  sample_tokens: int = 200
  sample_prompt: str = "def "
  temperature: float = 0.8

  def __post_init__(self):
    if (
      self.batches < 1
      or self.sample_tokens < 0
      or not (math.isfinite(self.temperature) and self.temperature >= 0)
    ):
      raise InputError("eval.batches >= 1, sample_tokens >= 0 and temperature >= 0 are required")


@config_dataclass
class MeshConfig:
  """Device mesh: sizes of the ``data``, ``fsdp``, ``tensor`` and ``context`` axes.

  -1 on one axis means "all remaining devices". The product must equal the device count.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  context: int = 1


SECTIONS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "mesh": MeshConfig}
TOP_LEVEL = ("model", "run_dir", "seed", *SECTIONS)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A validated experiment: ``model`` is the family's config dataclass."""

  model: Any
  data: DataConfig
  train: TrainConfig
  eval: EvalConfig
  mesh: MeshConfig
  run_dir: str
  seed: int
  source: str = "<dict>"

  def to_dict(self) -> dict[str, Any]:
    out = {"model": dataclasses.asdict(self.model)}
    out["model"] = {"name": out["model"].pop("family"), **out["model"]}
    for name in SECTIONS:
      out[name] = dataclasses.asdict(getattr(self, name))
    out["run_dir"] = self.run_dir
    out["seed"] = self.seed
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
  """``["train.steps=60", "model.d_model=64"]`` -> nested dict; values parsed as YAML."""
  out: dict[str, Any] = {}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
      value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
      raise ConfigError(f"override {item!r}: {_yaml_problem(e)}") from None
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
    node[parts[-1]] = value
  return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for k, v in over.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = merge(out[k], v)
    else:
      out[k] = v
  return out


def load(path: str | Path, overrides: list[str] | None = None) -> Experiment:
  """Reads, merges overrides into, and validates a YAML experiment file.

  ``path`` is a file, or the name of a recipe that ships with the package (``transformer_tiny``;
  see :mod:`pipelines.recipes`).
  """
  from pipelines import recipes

  try:
    path = recipes.resolve(path)
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from None
  try:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
  except UnicodeDecodeError:
    raise ConfigError(f"{path}: not a UTF-8 text file") from None
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
  if raw is None or raw == {}:
    # An empty file would otherwise train the default 200-step run into runs/default.
    raise ConfigError(
      f"{path}: the config is empty; give at least run_dir and a model (see configs/*.yaml)"
    )
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: the top level must be a mapping of sections")
  raw = merge(raw, parse_overrides(overrides or []))
  return from_dict(raw, source=str(path))


def _yaml_problem(err: yaml.YAMLError) -> str:
  """One line for a YAML error: where, and what (python tags are named as refused)."""
  mark = getattr(err, "problem_mark", None)
  where = f"line {mark.line + 1}: " if mark is not None else ""
  problem = getattr(err, "problem", None) or str(err).splitlines()[0]
  tag = re.search(r"tag '([^']+)'", problem)
  if tag:
    short = tag.group(1).replace("tag:yaml.org,2002:", "!!")
    return f"{where}the tag {short} is refused (configs hold plain values; tags are never run)"
  return f"{where}{problem}"


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> Experiment:
  """Validates a nested dict into an :class:`Experiment`; errors name the key and ``source``."""
  for key in raw:
    if key not in TOP_LEVEL:
      _unknown(source, key, key, list(TOP_LEVEL))
  sections = {}
  for name, cls in SECTIONS.items():
    sections[name] = _section(source, name, cls, raw.get(name) or {})
  model = _model(source, raw.get("model") or {})
  run_dir = raw.get("run_dir", "runs/default")
  seed = raw.get("seed", 0)
  if not isinstance(run_dir, str) or not run_dir:
    raise ConfigError(f"{source}: run_dir must be a non-empty string, got {run_dir!r}")
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise ConfigError(f"{source}: seed must be an integer, got {seed!r}")
  exp = Experiment(model=model, run_dir=run_dir, seed=seed, source=source, **sections)
  _cross_checks(exp)
  return exp


@dataclasses.dataclass(frozen=True)
class Stage:
  """A stage of a run: steps ``start + 1 .. end`` train ``exp`` (its data and model config)."""

  index: int
  name: str
  start: int
  end: int
  exp: Experiment

  @property
  def steps(self) -> int:
    return self.end - self.start

  def record(self) -> dict[str, Any]:
    """What the run record says about this stage."""
    d, m = self.exp.data, self.exp.model
    return {
      "stage": self.index,
      "name": self.name,
      "first_step": self.start + 1,
      "last_step": self.end,
      "seq_len": d.seq_len,
      "batch_size": d.batch_size,
      "position_factor": d.position_factor,
      "mixture": [{"name": s.label, "kind": s.kind, "weight": s.weight} for s in d.mixture],
      "rope_base": getattr(m, "rope_base", None),
      "rope_scaling": _plain_config(getattr(m, "rope_scaling", None)),
    }


def _plain_config(cfg: Any) -> Any:
  return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def stage_experiment(exp: Experiment, index: int) -> Experiment:
  """The experiment as stage ``index`` of ``train.stages`` trains it: the stage's data settings
  and RoPE base/scaling applied; every other field unchanged (``exp`` itself without stages).

  Raises:
    ConfigError: the stage sets RoPE fields the model family does not have.
  """
  stages = exp.train.stages
  if not stages:
    if index != 0:
      raise IndexError(f"an experiment without stages has only stage 0, not {index}")
    return exp
  st = stages[index]
  data: dict[str, Any] = {}
  for name in ("seq_len", "batch_size", "mixture", "position_factor"):
    if getattr(st, name) is not None:
      data[name] = getattr(st, name)
  model: dict[str, Any] = {}
  fields = field_names(exp.model)
  for key, field in (("rope_theta", "rope_base"), ("rope_scaling", "rope_scaling")):
    value = getattr(st, key)
    if value is None:
      continue
    if field not in fields:
      raise ConfigError(
        f"{exp.source}: train.stages[{index}].{key}: model {exp.model.family!r} has no "
        f"{field} to set"
      )
    model[field] = value
  try:
    return dataclasses.replace(
      exp,
      data=dataclasses.replace(exp.data, **data),
      model=dataclasses.replace(exp.model, **model),
    )
  except (pydantic.ValidationError, TypeError, ValueError) as e:
    raise ConfigError(f"{exp.source}: train.stages[{index}]: {e}") from None


def stage_plan(exp: Experiment) -> list[Stage]:
  """The stages the run trains, in order (one stage of ``train.steps`` when ``train.stages``
  is empty).

  ``train.steps`` is the run's length: stages are laid out by their ``steps``; a run shorter
  than their sum ends inside a stage (later stages are not run; a smoke test of a curriculum),
  a longer one continues the last stage to ``train.steps``.
  """
  total = exp.train.steps
  if not exp.train.stages:
    return [Stage(0, "stage0", 0, total, exp)]
  out, start = [], 0
  last = len(exp.train.stages) - 1
  for i, st in enumerate(exp.train.stages):
    if start >= total:
      break
    end = total if i == last else min(start + st.steps, total)
    out.append(Stage(i, st.name or f"stage{i}", start, end, stage_experiment(exp, i)))
    start = end
  return out


def stage_at(plan: list[Stage], step: int) -> Stage:
  """The stage that trains step ``step`` (1-based; past the end: the last stage)."""
  for stage in plan:
    if step <= stage.end:
      return stage
  return plan[-1]


def final_experiment(exp: Experiment) -> Experiment:
  """The experiment as its last stage trains it: what the trained model is (its RoPE settings
  and training length), for evaluation and extrapolation."""
  return stage_plan(exp)[-1].exp


def _cross_checks(exp: Experiment) -> None:
  if exp.train.stages:
    # Every stage is checked, including those a short run never reaches.
    for i in range(len(exp.train.stages)):
      stage_exp = stage_experiment(exp, i)  # its own errors name the stage
      try:
        _checks(stage_exp)
      except ConfigError as e:
        msg = str(e).removeprefix(f"{exp.source}: ")
        raise ConfigError(f"{exp.source}: train.stages[{i}]: {msg}") from None
  else:
    _checks(exp)


def _checks(exp: Experiment) -> None:
  if exp.data.position_factor > 1:
    cls = zoo.model_class(exp.model.family)
    if not getattr(cls, "accepts_positions", False):
      raise ConfigError(
        f"{exp.source}: data.position_factor={exp.data.position_factor}: model "
        f"{exp.model.family!r} does not take position ids (set position_factor: 1)"
      )
  if exp.data.batch_size % exp.train.grad_accum:
    raise ConfigError(
      f"{exp.source}: train.grad_accum={exp.train.grad_accum} must divide "
      f"data.batch_size={exp.data.batch_size}"
    )
  vocab = getattr(exp.model, "vocab_size", None)
  from pipelines.data.tokenizer import VOCAB_SIZE

  if vocab is not None and vocab < VOCAB_SIZE and exp.data.tokenizer == "byte":
    raise ConfigError(
      f"{exp.source}: model.vocab_size={vocab} is smaller than the byte tokenizer's "
      f"{VOCAB_SIZE} ids; token ids would fall outside the vocabulary"
    )
  max_len = getattr(exp.model, "max_len", None)
  if max_len is not None and exp.data.seq_len > max_len:
    raise ConfigError(
      f"{exp.source}: data.seq_len={exp.data.seq_len} is longer than the model's "
      f"max_len={max_len}; lower data.seq_len or raise model.max_len"
    )


def _unknown(source: str, path: str, key: str, valid: list[str]) -> None:
  hint = closest(key, valid)
  prefix = path[: len(path) - len(key)]
  suffix = f"; did you mean {prefix + hint!r}?" if hint else f"; valid keys: {sorted(valid)}"
  raise ConfigError(f"{source}: unknown key {path!r}{suffix}")


def _section(source: str, name: str, cls: type, values: Any) -> Any:
  if not isinstance(values, dict):
    raise ConfigError(f"{source}: section {name!r} must be a mapping, got {values!r}")
  valid = field_names(cls)
  for key in values:
    if key not in valid:
      _unknown(source, f"{name}.{key}", key, valid)
  try:
    return cls(**values)
  except pydantic.ValidationError as e:
    raise ConfigError(_explain(source, name, e)) from None
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{source}: {name}: {e}") from None


def _model(source: str, values: Any) -> Any:
  if not isinstance(values, dict):
    raise ConfigError(f"{source}: section 'model' must be a mapping")
  values = dict(values)
  name = values.pop("name", "transformer")
  preset = values.pop("preset", "tiny")
  try:
    cfg = zoo.presets(name)
  except ValueError as e:
    raise ConfigError(f"{source}: model.name: {e}") from None
  if preset not in cfg:
    # A misspelt value (not a key): suggest the preset itself, not a dotted path.
    hint = closest(str(preset), list(cfg))
    suffix = f"; did you mean {hint!r}?" if hint else f"; valid presets: {sorted(cfg)}"
    raise ConfigError(f"{source}: unknown model.preset {preset!r} for {name!r}{suffix}")
  valid = field_names(cfg[preset]())
  for key in values:
    if key not in valid or key == "family":
      _unknown(
        source, f"model.{key}", key, [v for v in valid if v != "family"] + ["name", "preset"]
      )
  try:
    return zoo.config(name, preset, **values)
  except pydantic.ValidationError as e:
    raise ConfigError(_explain(source, "model", e)) from None
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{source}: model: {e}") from None


def _explain(source: str, section: str, err: pydantic.ValidationError) -> str:
  lines = []
  for e in err.errors():
    loc = ".".join(str(x) for x in e["loc"] if x != "__post_init__")
    key = f"{section}.{loc}" if loc else section
    lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
  return f"{source}: invalid config:\n  " + "\n  ".join(lines)


def dump(exp: Experiment, path: str | Path) -> None:
  """Writes the resolved config as YAML (what the run actually used), atomically."""
  from pipelines.rundir import atomic_write_text

  atomic_write_text(path, yaml.safe_dump(exp.to_dict(), sort_keys=False))
