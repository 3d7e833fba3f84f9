"""Llama-style decoder: RMSNorm, SwiGLU, grouped-query attention, RoPE."""

from zoo.transformer.config import TransformerConfig
from zoo.transformer.model import Transformer

__all__ = ["Transformer", "TransformerConfig"]
