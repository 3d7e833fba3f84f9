"""Titans: neural long-term memory (MAC, MAG, MAL, LMM) with persistent memory tokens."""

from zoo.titans.config import TitansConfig
from zoo.titans.model import Titans

__all__ = ["Titans", "TitansConfig"]
