"""Padded batches: which tokens of each row are real, where they sit, and how attention skips the pads.

Prompts of different lengths share a batch by padding: on the left for generation (the
``pipeline``, lm_eval's ``generate_until``), on the right for training. ``attention_mask``
(B, Tk) is 1 at real tokens. For every encoding the real tokens of a padded row give what the
row's tokens alone give, because

- every query ignores pad keys (``key_padding``, applied by ``attention.attend``);
- each row's real tokens take positions 0, 1, ... (``positions``), so the encodings that read
  absolute positions (rotary ones, GRAPE-AP's probe rotations R_ℓ, grid coordinates) see the
  positions of the unpadded row;
- cumulative encodings (FoX's forget sums, GRAPE-M-ctx's and the phase encodings' clocks) add
  nothing at a pad (``real``), and KV-shift's previous projection of a row's first real token
  is 0, as for the first token of an unpadded row.

Relative additive encodings (ALiBi, GRAPE-A) need only the mask: pads before or after a row's
real tokens do not change the distance between two of them. A mask whose real tokens are not
one contiguous run (a pad between two real tokens) is refused: distances would count the pad.

The fast attention paths must not build a (B, H, Tq, Tk) mask. A key-padding mask is a
function of the key alone, so it rides in the q·k product as one more column: queries carry a
large negative constant, keys carry 1 at a pad and 0 at a real token (``with_key_padding``).
A real key's logit gains an exact 0; a pad key's logit drops by ``PAD_LOGIT`` and its weight
underflows to exactly 0. Every backend that forms q·k (SDPA, the chunked paths) then masks pads
without knowing about them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

# A pad key's logit offset: exp(-1e6 + anything a real logit can be) is exactly 0 in float32.
PAD_LOGIT = -1e6


@dataclass
class Layout:
    """Where the real tokens of a batch are. None fields mean "as in an unpadded batch"."""
    positions: Optional[Tensor] = None      # (B, Tq) long: each query's position in its own row
    key_padding: Optional[Tensor] = None    # (B, Tk) bool: True at pad keys (cached keys first)
    real: Optional[Tensor] = None           # (B, Tq) bool: True at the queries that are real tokens

    @classmethod
    def of(cls, attention_mask: Optional[Tensor], position_ids: Optional[Tensor], n_cached: int,
           n_new: int, batch: int) -> Optional["Layout"]:
        """The layout of ``n_new`` tokens after ``n_cached`` cached ones, from transformers'
        ``attention_mask`` (B, n_cached + n_new), 1 at real tokens) and ``position_ids``
        (B|1, n_new). None when neither says anything an unpadded batch would not."""
        key_padding = None
        if attention_mask is not None:
            key_padding = padding_of(attention_mask, n_cached, n_new, batch)
        positions = None
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[-1] != n_new or position_ids.shape[0] not in (1, batch):
                raise ValueError(f"position_ids must be (batch, tokens) = ({batch}, {n_new}), "
                                 f"got {tuple(position_ids.shape)}")
            positions = position_ids.long().expand(batch, n_new)
        elif key_padding is not None:
            # real tokens count 0, 1, ...; a pad takes its neighbour's position (never read)
            positions = ((~key_padding).long().cumsum(-1) - 1).clamp(min=0)[:, -n_new:]
        if positions is not None:
            plain = torch.arange(n_cached, n_cached + n_new, device=positions.device)
            if bool((positions == plain).all()):
                positions = None
        if key_padding is None and positions is None:
            return None
        real = None if key_padding is None else ~key_padding[:, -n_new:]
        return cls(positions=positions, key_padding=key_padding, real=real)

    def last_position(self, n_cached: int, n_new: int) -> int:
        """The largest position a query takes (block_size bounds it)."""
        if self.positions is None:
            return n_cached + n_new - 1
        return int(self.positions.max())


def padding_of(attention_mask: Tensor, n_cached: int, n_new: int, batch: int) -> Optional[Tensor]:
    """(B, Tk) True at pads, or None when every token is real; one clear error for a mask this
    model cannot honour."""
    mask = attention_mask
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D (batch, tokens) with 1 at real tokens and 0 at pads, got "
                         f"shape {tuple(mask.shape)}")
    if mask.shape[0] != batch or mask.shape[1] != n_cached + n_new:
        raise ValueError(f"attention_mask is {tuple(mask.shape)} but the batch has {batch} rows of "
                         f"{n_cached} cached + {n_new} new tokens")
    real = mask.bool() if mask.dtype == torch.bool else mask != 0
    if bool(real.all()):
        return None
    # real tokens must be one run per row: after a row's real tokens end, none may follow
    started = real.long().cummax(-1).values.bool()
    ended = (started & ~real).long().cummax(-1).values.bool()
    if bool((ended & real).any()):
        raise ValueError("attention_mask has a pad between two real tokens of a row; pad on the left "
                         "(tokenizer.padding_side = 'left', needed to generate) or on the right")
    return ~real


def with_key_padding(attend: Callable, q: Tensor, k: Tensor, v: Tensor, bias, key_padding: Tensor) -> Tensor:
    """``attend(q, k, v, bias)`` with the keys where ``key_padding`` (B, Tk) is True masked, through
    one extra q·k column (module docstring); widths padded to a multiple of 8 (what the CPU flash
    kernel wants). The scale the backend applies (1/√width) is compensated on q's columns."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    width = -(-(D + 1) // 8) * 8
    # q·k/√D = (c q)·k/√width with c = √(width/D); the pad column then carries PAD_LOGIT·√width,
    # bounded in half precision so that it stays finite
    column = -min(-PAD_LOGIT * math.sqrt(width), torch.finfo(q.dtype).max / 16)
    fill = width - D - 1
    qa = torch.cat([q * math.sqrt(width / D), q.new_full((B, H, Tq, 1), column), q.new_zeros((B, H, Tq, fill))], -1)
    pads = key_padding.to(device=k.device, dtype=k.dtype)[:, None, :, None].expand(B, H, Tk, 1)
    ka = torch.cat([k, pads, k.new_zeros((B, H, Tk, fill))], -1)
    va = torch.cat([v, v.new_zeros((B, H, Tk, width - D))], -1)
    return attend(qa, ka, va, bias)[..., :D]
