"""memzoo models. ``zoo.list_models()``, ``zoo.config(name, preset, **overrides)``,
``zoo.build(config, rngs=...)``; every model returns ``(logits, aux)`` and decodes with
``init_state`` / ``step``."""

from zoo.registry import build, config, family, list_models, presets, register

register("transformer", "zoo.transformer", "Transformer", "Llama-style baseline (GQA, RoPE, SwiGLU)")

__all__ = ["build", "config", "family", "list_models", "presets", "register"]
