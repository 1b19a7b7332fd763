"""Fine-tuning: config, data, the training loop, checkpoints and metrics."""
