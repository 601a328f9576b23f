"""Training machinery: checkpoints, distributed set-up, precision, the DINO training loop."""
