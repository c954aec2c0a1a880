"""ADMM compression: configuration, projections, per-layer allocation, the training loop."""
