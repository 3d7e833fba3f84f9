"""Landmark attention: grouped softmax over blocks, top-k block retrieval at inference."""

from zoo.landmark.config import PRESETS, LandmarkConfig
from zoo.landmark.model import Landmark, grouped_attention

__all__ = ["PRESETS", "Landmark", "LandmarkConfig", "grouped_attention"]
