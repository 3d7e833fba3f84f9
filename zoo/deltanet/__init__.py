"""DeltaNet: linear attention with the delta-rule write, short convolutions, L2-normalised keys."""

from zoo.deltanet.config import DeltaNetConfig
from zoo.deltanet.model import DeltaNet

__all__ = ["DeltaNet", "DeltaNetConfig"]
