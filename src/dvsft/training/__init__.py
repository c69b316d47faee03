"""Training: losses, models, the HF Trainer recipe."""
