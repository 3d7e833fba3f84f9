"""Gated DeltaNet: DeltaNet with a data-dependent scalar decay per head and an output gate."""

from zoo.gated_deltanet.config import GatedDeltaNetConfig
from zoo.gated_deltanet.model import GatedDeltaNet

__all__ = ["GatedDeltaNet", "GatedDeltaNetConfig"]
