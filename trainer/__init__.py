"""Training: config, distributed environment, DeepSpeed engine, sandwich step, checkpoints."""
