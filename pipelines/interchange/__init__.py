"""Interchange: Hugging Face import/export, safetensors, StableHLO."""
