"""The main DVC pipeline's own code (dvc.yaml): its params file, per-epoch histories, the report."""
