"""Evaluation of prediction folders against reference labels: per-case tables, summaries with bootstrap
intervals, comparisons, plots and MLflow records. The metric functions themselves are in ``medseg.metrics``."""
