"""The configuration every recurrent language model shares (BASED, DeltaNet, gated DeltaNet,
Mamba-2, MoM, JRT): a family subclass adds its mixer's fields and checks, and derives its presets
from the shared sizes. No Flax here: reading a config never loads a model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

from zoo.configbase import Implementation, config_dataclass

# Shared sizes of the presets; a family's own fields (heads, state widths) are added on top.
TINY: Mapping[str, Any] = {"d_model": 64, "n_layers": 2, "d_ff": 128}
SMALL: Mapping[str, Any] = {"d_model": 512, "n_layers": 8, "d_ff": 1408, "max_len": 2048}
BASE: Mapping[str, Any] = {
  "d_model": 768,
  "n_layers": 12,
  "d_ff": 2048,
  "max_len": 4096,
  "dtype": "bfloat16",
}


@config_dataclass
class RecurrentLMConfig:
  """Fields of the language-model stack around the mixers (``zoo.layers.recurrent_lm``).

  Attributes:
    vocab_size: number of token ids (the byte tokenizer has 260).
    d_model: residual width D.
    n_layers: number of blocks.
    d_ff: SwiGLU hidden width (0 = no MLP).
    max_len: longest sequence (full-attention decode cache size default).
    conv_width: short causal convolution before the mixer (0 = none).
    attention_layers: indices of the layers that are softmax attention instead.
    window: sliding window of those attention layers (None = full causal attention).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: output projection = transposed input embedding.
    dtype: compute dtype; parameters and memory states stay float32.
    chunk_size: ``gated_delta_rule`` chunk length (a power of two).
    memory_impl: ``gated_delta_rule`` implementation: a name, a list tried in order, or None
      (the backend's default list).
    attention_impl: ``ops.attention`` implementation, same forms.
  """

  vocab_size: int = 260
  d_model: int = 128
  n_layers: int = 2
  d_ff: int = 384
  max_len: int = 512
  conv_width: int = 4
  attention_layers: tuple[int, ...] = ()
  window: int | None = None
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  chunk_size: int = 64
  memory_impl: Implementation = None
  attention_impl: Implementation = None

  # Family-specific preset fields, merged over TINY / SMALL / BASE by ``presets``.
  PRESET_FIELDS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "max_len", "chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.d_ff < 0:
      raise ValueError(f"d_ff must be >= 0 (0 = no MLP), got {self.d_ff}")
    if self.chunk_size & (self.chunk_size - 1):
      raise ValueError(f"chunk_size must be a power of two, got {self.chunk_size}")
    if self.conv_width < 0:
      raise ValueError(f"conv_width must be >= 0 (0 = no short convolution), got {self.conv_width}")
    for i in self.attention_layers:
      if not 0 <= i < self.n_layers:
        raise ValueError(f"attention_layers entry {i} is not a layer index in [0, {self.n_layers})")
    if len(set(self.attention_layers)) != len(self.attention_layers):
      raise ValueError(f"attention_layers has duplicates: {self.attention_layers}")
    if self.window is not None and self.window < 1:
      raise ValueError(f"window must be >= 1 or null, got {self.window}")

  def check_positive(self, *names: str) -> None:
    """Raises ValueError naming the first of ``names`` that is < 1."""
    for name in names:
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# Mamba-2's initial decay: A ~ U(1, 16), softplus(dt_bias) log-uniform in [1e-3, 0.1].
A_INIT_RANGE = (1.0, 16.0)
DT_INIT_RANGE = (1e-3, 1e-1)


@config_dataclass
class DecayInit:
  """How the families with Mamba-2's decay ``g = -exp(A_log) softplus(x W_a + dt_bias)`` (gated
  DeltaNet, Mamba-2, MoM) draw it at initialisation: ``A_init_range`` and ``dt_min, dt_max`` of
  ``mamba_ssm`` and fla. A mixin: the family config checks it in its ``__post_init__``.

  Attributes:
    a_init_range: ``A = exp(A_log)`` uniform in ``[lo, hi]`` per head, ``0 <= lo <= hi``.
      Mamba-2's ``(1, 16)`` by default (fla's gated DeltaNet and MoM draw ``(0, 16)``). A
      lower range starts with a longer memory: per token a head keeps
      ``exp(-A softplus(x W_a + dt_bias))`` of what it holds.
    dt_init_range: ``softplus(dt_bias)`` log-uniform in ``[lo, hi]`` per head, ``0 < lo <= hi``.
  """

  a_init_range: tuple[float, float] = A_INIT_RANGE
  dt_init_range: tuple[float, float] = DT_INIT_RANGE

  def check_decay_init(self) -> None:
    lo, hi = self.a_init_range
    if not 0 <= lo <= hi:
      raise ValueError(f"a_init_range must be (lo, hi) with 0 <= lo <= hi, got {self.a_init_range}")
    lo, hi = self.dt_init_range
    if not 0 < lo <= hi:
      raise ValueError(
        f"dt_init_range must be (lo, hi) with 0 < lo <= hi, got {self.dt_init_range}"
      )


def presets(cls: type[RecurrentLMConfig]) -> dict[str, Callable[..., Any]]:
  """``{"tiny", "small", "base"}`` constructors of ``cls``: the shared sizes, then the family's
  ``PRESET_FIELDS[name]``, then the caller's overrides."""

  def make(name: str, shared: Mapping[str, Any]) -> Callable[..., Any]:
    def preset(**overrides: Any) -> Any:
      return cls(**{**shared, **cls.PRESET_FIELDS.get(name, {}), **overrides})

    preset.__name__ = name
    preset.__doc__ = f"The {name!r} preset of {cls.__name__}."
    return preset

  return {"tiny": make("tiny", TINY), "small": make("small", SMALL), "base": make("base", BASE)}
