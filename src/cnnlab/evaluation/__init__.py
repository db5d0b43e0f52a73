"""Evaluation of trained checkpoints: test-time views (multi-crop), reports, ensembles."""
