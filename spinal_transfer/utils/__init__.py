"""Utilities every layer may use: atomic files, file names in text files (`textfiles`), the file lock, runtime
settings, torch.distributed, preemption signals and experiment tracking. Imports nothing above errors/config."""
