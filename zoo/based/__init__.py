"""BASED: Taylor-feature linear attention, short convolutions and sliding-window attention."""

from zoo.based.config import BasedConfig
from zoo.based.model import Based

__all__ = ["Based", "BasedConfig"]
