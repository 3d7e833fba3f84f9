"""Hope (Nested Learning): self-modifying Titans memory and the continuum memory system."""

from zoo.hope.config import HopeConfig
from zoo.hope.model import Hope

__all__ = ["Hope", "HopeConfig"]
