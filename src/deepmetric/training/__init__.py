"""Training: the config, checkpoints, the run folder and the trainer behind `deepmetric train`."""
