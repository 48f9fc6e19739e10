"""Evaluating a model, metrics and statistics, interpretation, plots, tables and the report page."""
