"""HMT: segment recurrence with sensory memory, memory embeddings and memory recall."""

from zoo.hmt.config import PRESETS, HMTConfig
from zoo.hmt.model import HMT

__all__ = ["HMT", "HMTConfig", "PRESETS"]
