"""What one attention layer keeps while decoding (streaming KV-cache decoding, SPEC §6).

The attention stores rotated keys and values here, the encodings their own key-side state;
``generation.py`` holds one ``LayerCache`` per layer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class LayerCache:
    """What one attention layer keeps while decoding: named tensors grown along time.

    The attention stores rotated keys/values here; encodings store their own key-side
    quantities (key gates, cumulative log-forget sums, rotated probes, running phase).
    """

    def __init__(self):
        self.length = 0          # tokens already seen by this layer
        self.tensors: dict[str, Tensor] = {}

    def extend(self, name: str, new: Tensor, dim: int = 2) -> Tensor:
        """Append ``new`` along ``dim`` to the stored tensor and return the whole of it."""
        old = self.tensors.get(name)
        full = new if old is None else torch.cat([old, new], dim=dim)
        self.tensors[name] = full
        return full

    def get(self, name: str) -> Optional[Tensor]:
        return self.tensors.get(name)

    def set(self, name: str, value: Tensor) -> None:
        self.tensors[name] = value

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search / batch reordering)."""
        self.tensors = {n: t.index_select(0, index.to(t.device)) for n, t in self.tensors.items()}
