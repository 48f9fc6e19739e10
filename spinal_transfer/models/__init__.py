"""Backbones, heads and the surgery that joins them; weights, the Hub, preprocessing settings, and
rebuilding a model from a checkpoint."""
