"""Evaluation: held-out loss, the synthetic suite, extrapolation, generation, MQAR."""
