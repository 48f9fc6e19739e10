"""Utilities every layer may use: atomic files, the file lock, runtime settings, torch.distributed,
preemption signals and experiment tracking. Imports nothing above errors/config."""
