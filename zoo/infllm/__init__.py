"""InfLLM: sinks + local window + top-k retrieved memory blocks on any transformer; EM-LLM's
surprise-segmented events and host offload of the committed memory as options."""

from zoo.infllm.config import PRESETS, InfLLMConfig
from zoo.infllm.eventcache import EventMemoryCache
from zoo.infllm.memory import BlockMemoryCache
from zoo.infllm.model import InfLLM, from_transformer
from zoo.infllm.store import HostBlockStore

__all__ = [
  "PRESETS",
  "BlockMemoryCache",
  "EventMemoryCache",
  "HostBlockStore",
  "InfLLM",
  "InfLLMConfig",
  "from_transformer",
]
