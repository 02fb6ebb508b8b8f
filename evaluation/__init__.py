"""Evaluation: metrics and their intervals, the linear probe, kNN accuracy, per-image predictions, figures and
the report (python -m evaluation.report runs/)."""
