"""Causal attention with an optional additive bias, evaluated by one of several backends.

``attend(q, k, v, bias, backend)`` is the only entry point the model uses. ``bias`` is
None (multiplicative encodings, NoPE) or one of the bias descriptions in ``grape.py``.
Queries are the last Tq of the Tk key positions (Tq == Tk in training; Tq < Tk while
decoding with a cache).

- ``dense``: the reference. Builds the full (B, H, Tq, Tk) logits, bias and mask. Tests
  compare every other path against it; it is also the cheapest path for tiny shapes.
- ``sdpa``: ``F.scaled_dot_product_attention`` (FlashAttention on GPU) when there is no bias.
- ``chunked`` (attention_chunked.py): plain PyTorch, linear memory, any device; the CPU
  training path for every additive bias.
- ``flex`` (attention_flex.py): ``flex_attention`` with a ``score_mod`` for SeparableBias (GPU).
- ``triton`` (grape_ap_triton.py): the GRAPE-AP kernel (GPU, or ``TRITON_INTERPRET=1``).
Backends that cannot serve a case (flex with a path-integral bias, decoding with Tq < Tk in
the compiled kernels) hand it to the chunked path, which serves everything.
``auto`` picks with ``choose_backend``; it never picks a T² path for long sequences.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_mask(n_queries: int, n_keys: int, device) -> Tensor:
    """(Tq, Tk) boolean, True where key j is visible to query t (queries end with the keys)."""
    q_idx = torch.arange(n_keys - n_queries, n_keys, device=device)
    return torch.arange(n_keys, device=device)[None, :] <= q_idx[:, None]


def dense_logits(q: Tensor, k: Tensor, bias=None) -> Tensor:
    """Full pre-softmax logits q·k/√d + b(t, j), masked to -inf above the diagonal (float32)."""
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.dense().float()
    mask = causal_mask(q.shape[2], k.shape[2], q.device)
    return logits.masked_fill(~mask, float("-inf"))


def dense_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    probs = torch.softmax(dense_logits(q, k, bias), dim=-1)
    return (probs @ v.float()).to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    if bias is not None:
        raise ValueError("the sdpa backend handles encodings without an additive bias only")
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk, q.device))


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    from attention_chunked import chunked_attention as run
    return run(q, k, v, bias)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    from attention_flex import flex_attention as run
    return run(q, k, v, bias)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    """GRAPE-AP kernel for training shapes; everything else goes where it runs best."""
    from grape import PathIntegralBias
    if not isinstance(bias, PathIntegralBias) or q.shape[2] != k.shape[2]:
        return chunked_attention(q, k, v, bias)
    from grape_ap_triton import grape_ap_triton_attention    # imported lazily: needs triton
    return grape_ap_triton_attention(q, k, v, bias)


BACKENDS: dict[str, Callable] = {
    "dense": dense_attention,
    "sdpa": sdpa_attention,
    "chunked": chunked_attention,
    "flex": flex_attention,
    "triton": triton_attention,
}



def backend_choices() -> tuple[str, ...]:
    """What ``attn_backend`` accepts: 'auto' and the names of BACKENDS."""
    return ("auto", *BACKENDS)


# On CPU the dense path is only worth it while the (B, H, Tq, Tk) tensors are tiny.
CPU_DENSE_MAX_KEYS = 256


def choose_backend(q: Tensor, bias, device_type: Optional[str] = None) -> str:
    """The fastest correct backend for this device and bias (``device_type`` overrides
    ``q.device.type``, e.g. to ask what would run on CUDA)."""
    if bias is None:
        return "sdpa"
    device_type = device_type or q.device.type
    n_queries, n_keys = q.shape[2], bias.n_keys
    from grape import PathIntegralBias
    if device_type == "cuda" and n_queries == n_keys:
        if isinstance(bias, PathIntegralBias):
            return "triton" if _have_module("triton") and _have_module("grape_ap_triton") else "chunked"
        return "flex"
    if device_type == "cpu" and n_keys < CPU_DENSE_MAX_KEYS:
        return "dense"
    return "chunked"        # decoding, long CPU sequences, other devices: linear memory


@functools.lru_cache(maxsize=None)
def _have_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


_denormals = threading.local()


def flush_denormals_on_cpu(device: torch.device) -> None:
    """Softmax weights of far keys (logits 87-103 below the row max: ALiBi-like biases at
    long T, RoPE's tails) underflow into denormal floats, and x86 arithmetic on denormals
    makes the CPU flash kernel up to 4x slower. Flushing them to zero (|x| < 1.2e-38) changes
    no result at float32 resolution. The switch is per thread, so it is set once per thread."""
    if device.type == "cpu" and not getattr(_denormals, "flushed", False):
        torch.set_flush_denormal(True)
        _denormals.flushed = True


def attend(q: Tensor, k: Tensor, v: Tensor, bias=None, backend: str = "auto") -> Tensor:
    flush_denormals_on_cpu(q.device)
    if backend == "auto":
        backend = choose_backend(q, bias)
    elif bias is None and backend != "dense":
        backend = "sdpa"      # every fast path reduces to SDPA when there is no bias
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attn_backend {backend!r}; choose one of {backend_choices()}") from None
    return fn(q, k, v, bias)
