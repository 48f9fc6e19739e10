"""The run folder and the checkpoint file format (what is written where, verified on load)."""
