"""What a checkpoint folder ships beside model.py and grape.py: attention backends and kernels,
bias descriptions, the decoding cache and loop, and the code that makes a saved folder
self-contained. Modules here import each other relatively and never import model, grape or
anything repository-only, so ``shipping.py`` can copy them flat into a folder."""
