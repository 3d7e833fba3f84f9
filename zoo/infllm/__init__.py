"""InfLLM: sinks + local window + top-k retrieved memory blocks on any transformer."""

from zoo.infllm.config import PRESETS, InfLLMConfig
from zoo.infllm.memory import BlockMemoryCache
from zoo.infllm.model import InfLLM, from_transformer

__all__ = ["PRESETS", "BlockMemoryCache", "InfLLM", "InfLLMConfig", "from_transformer"]
