"""Repository-only library code: the training loop and its settings, checkpoints, run folders,
data, sizing, conversion of the original's checkpoints, evaluation helpers. No programs here
(those are in scripts/); nothing here is shipped in checkpoint folders."""
