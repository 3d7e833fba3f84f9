"""StreamingLLM: attention sinks + a rolling window, with position shift, on any transformer."""

from zoo.streaming.config import PRESETS, StreamingConfig
from zoo.streaming.model import StreamingLLM, from_transformer

__all__ = ["PRESETS", "StreamingConfig", "StreamingLLM", "from_transformer"]
