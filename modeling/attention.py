"""Causal attention with an optional additive bias: the dispatcher over the backends.

Tensor shapes, here and in every module of this package and in ``grape.py``:

    B   batch                         H   heads            D   head width (head_dim)
    T   tokens of a training sequence  Tq  queries          Tk  keys (Tk >= Tq: cached keys first)
    C   model width (n_embd)           V   vocabulary       dp  GRAPE-AP probe width (p_head_dim)

q, k, v are (B, H, T|Tq|Tk, D); a bias is a description of the (B, H, Tq, Tk) logit offsets
(``bias.py``), never that tensor; the attention output is (B, H, Tq, D). The Tq queries are
the last Tq of the Tk key positions.

``attend(q, k, v, bias, backend, key_padding)`` is the only entry point the model uses. ``bias``
is None (multiplicative encodings, NoPE) or a ``bias.Bias`` description. Queries are the last
Tq of the Tk key positions (Tq == Tk in training; Tq < Tk while decoding with a cache).
``key_padding`` (B, Tk), True at the pad keys of a padded batch (``padding.py``), or None.

- ``dense`` (dense.py): the reference. Builds the full (B, H, Tq, Tk) logits,
  bias and mask. Tests compare every other path against it; it is also the cheapest path
  for tiny shapes.
- ``sdpa``: ``F.scaled_dot_product_attention`` (FlashAttention on GPU) when there is no bias.
- ``chunked`` (chunked.py): plain PyTorch, linear memory, any device, any Bias;
  the CPU training path for every additive bias (GRAPE-AP's through the fused C++ kernel
  of grape_ap_cpu.py where it is built).
- ``flex`` (flex.py): ``flex_attention`` with the bias's ``score_mod`` (GPU).
- ``triton`` (grape_ap_triton.py): the GRAPE-AP kernel (GPU, or ``TRITON_INTERPRET=1``).
Backends that cannot serve a case (flex with a bias that has no score_mod, decoding with
Tq < Tk or a padded batch in the compiled kernels) hand it to the chunked path, which serves
everything. Pad keys are masked by the dense reference explicitly, by every other path through
one extra q·k column (``padding.with_key_padding``): no (B, H, Tq, Tk) mask is built.
``auto`` picks with ``choose_backend``; it never picks a T² path for long sequences.

The backends import only dense.py and bias.py; this module imports them (flex
and triton lazily: they pull in compilers that a CPU run never needs).
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, Optional

import torch
from torch import Tensor

from .chunked import chunked_attention
from .dense import causal_mask, dense_attention, dense_logits, sdpa_attention  # noqa: F401
from .bias import PathIntegralBias
from .padding import with_key_padding


def flex_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    score_mod = bias.score_mod(q.shape[0], q.shape[1]) if q.shape[2] == k.shape[2] else None
    if score_mod is None:
        return chunked_attention(q, k, v, bias)
    from .flex import flex_attention as run_flex     # imported lazily: compiles with inductor
    return run_flex(q, k, v, score_mod)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    """GRAPE-AP kernel for training shapes; everything else goes where it runs best."""
    if type(bias) is not PathIntegralBias or q.shape[2] != k.shape[2]:
        return chunked_attention(q, k, v, bias)
    from .grape_ap_triton import grape_ap_triton_attention    # imported lazily: needs triton
    return grape_ap_triton_attention(*autocast_operands(q, k, v), bias)


def autocast_operands(q: Tensor, k: Tensor, v: Tensor):
    """q, k, v in autocast's dtype when autocast is on for their device, as autocast hands them
    to SDPA. Under autocast QK-RMSNorm's float32 weight makes q and k float32 while v is not,
    and a fused kernel takes one dtype (and should run in the 16-bit one)."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


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
    if device_type == "cuda" and n_queries == n_keys:
        if type(bias) is PathIntegralBias:
            return "triton" if _have_module("triton") and _have_module(".grape_ap_triton") else "chunked"
        return "flex"
    if device_type == "cpu" and n_keys < CPU_DENSE_MAX_KEYS:
        return "dense"
    return "chunked"        # decoding, long CPU sequences, other devices: linear memory


@functools.lru_cache(maxsize=None)
def _have_module(name: str) -> bool:
    """Whether ``name`` can be imported; '.x' is a sibling module, found the same way in the
    repository (package ``modeling``) and in a checkpoint folder run as remote code."""
    import importlib.util
    return importlib.util.find_spec(name, package=__package__) is not None


_denormals = threading.local()
_workers_flushed = {"threads": None}       # the pool size whose threads were last flushed


def flush_denormals_on_cpu(device: torch.device, bias=None) -> None:
    """Softmax weights of far keys (logits 87-103 below the row max: ALiBi-like biases at
    long T, RoPE's tails) underflow into denormal floats, and x86 arithmetic on denormals
    makes the CPU flash kernel up to 4x slower. Flushing them to zero (|x| < 1.2e-38) changes
    no result at float32 resolution. The switch is per thread: the calling thread's is set
    once; with a bias (where far keys' weights underflow most), the intra-op pool's threads
    are set too, through the CPU kernel (grape_ap_cpu.flush_denormals_in_workers), once per
    pool size."""
    if torch.compiler.is_compiling():      # a switch, not a tensor op: set by the eager calls
        return
    if device.type != "cpu":
        return
    if not getattr(_denormals, "flushed", False):
        torch.set_flush_denormal(True)
        _denormals.flushed = True
    if bias is not None and _workers_flushed["threads"] != torch.get_num_threads():
        from .grape_ap_cpu import flush_denormals_in_workers
        flush_denormals_in_workers()
        _workers_flushed["threads"] = torch.get_num_threads()


def resolve_backend(q: Tensor, bias, backend: str = "auto") -> str:
    """The backend ``attend`` runs for this case."""
    if backend == "auto":
        return choose_backend(q, bias)
    if bias is None and backend != "dense":
        return "sdpa"         # every fast path reduces to SDPA when there is no bias
    return backend


def attend(q: Tensor, k: Tensor, v: Tensor, bias=None, backend: str = "auto",
           key_padding: Optional[Tensor] = None) -> Tensor:
    flush_denormals_on_cpu(q.device, bias)
    backend = resolve_backend(q, bias, backend)
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attn_backend {backend!r}; choose one of {backend_choices()}") from None
    if key_padding is None:
        return fn(q, k, v, bias)
    if backend == "dense":
        return dense_attention(q, k, v, bias, key_padding)
    if backend in ("flex", "triton"):        # compiled for unpadded shapes; padding is for inference
        fn = chunked_attention
    return with_key_padding(fn, q, k, v, bias, key_padding)
