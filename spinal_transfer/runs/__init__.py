"""A run's folder (its lock, layout, config and reports) and the checkpoint file format."""
