"""MoM: mixture of memories, several routed linear-memory states per layer plus a shared one."""

from zoo.mom.config import MoMConfig
from zoo.mom.model import MoM

__all__ = ["MoM", "MoMConfig"]
