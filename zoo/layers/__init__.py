"""Layers shared by two or more families: parameters, norms, MLPs, RoPE, attention."""
