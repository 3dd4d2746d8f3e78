"""Ray Train: the config, the training loop per worker, the driver, inputs, optimiser, tracking."""
