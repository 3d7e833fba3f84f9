"""Training: the train loop, its checkpoints, metrics and optimizer."""
