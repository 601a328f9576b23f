"""Self-supervised and contrastive objectives."""
