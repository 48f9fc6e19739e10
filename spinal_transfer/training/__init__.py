"""The training loop, optimizers and schedules, best-epoch selection, lr-find, cached features, previews."""
