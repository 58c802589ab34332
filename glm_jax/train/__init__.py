"""Training: the step, the loop, optimizer, checkpoints, metrics and FLOPs."""
