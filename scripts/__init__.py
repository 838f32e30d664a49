"""Command-line programs, run from the repository root as ``python -m scripts.NAME``."""
