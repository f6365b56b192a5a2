"""Training: networks, losses, augmentation, datasets, checkpoints, samplers, metrics, loops."""
