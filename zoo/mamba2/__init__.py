"""Mamba-2: SSD blocks (scalar-decay state space model) on ``gated_delta_rule``."""

from zoo.mamba2.config import Mamba2Config
from zoo.mamba2.model import Mamba2

__all__ = ["Mamba2", "Mamba2Config"]
