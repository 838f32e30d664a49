"""Start-up self-check of the fast attention backends: the first GPU run fails in its first
minute, with an error that says what to do, instead of training on a broken kernel.

Before the first training step, ``check_backends(model, dtype)`` runs the model's first
attention layer on a small random batch (its own weights and encoding, the model's autocast
dtype) through each fast backend the model will use (flex, triton, sdpa: whatever ``auto`` or
``attn_backend`` resolves to for its encoding on this device) and through the dense reference,
and compares the output and the gradients of the input and of every parameter of the layer.
When a backend disagrees, its named fallback is compared too before the error is raised, so the
advice the error gives is itself checked.

Tolerance: each compared tensor's relative error ||fast - dense|| / ||dense|| must stay below
TOLERANCE_UNITS unit roundoffs of the dtype the kernels compute in (bfloat16 2^-8, float16
2^-11; float32 counts as TF32, 2^-11). A correct 16-bit kernel rounds its softmax weights, its
output, and dS once each (about one unit per rounded operand on the output, two or three on
the gradients once the rounded output feeds Delta = rowsum(dO * O)); 8 units leave a factor of
2-3 for cancellation. Mistakes give errors of order one: a dropped bias, a gradient that
misses the gates, a causal mask off by one key.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from modeling.attention import BACKENDS, dense_attention, resolve_backend

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -11}
TOLERANCE_UNITS = 8
# What to train with instead when a backend fails (attend maps every backend but dense to
# sdpa when an encoding has no bias, so sdpa's only alternative is the T^2 dense path).
FALLBACK = {"flex": "chunked", "triton": "chunked", "sdpa": "dense"}
CHECKED = tuple(FALLBACK)


class BackendMismatch(RuntimeError):
    """A fast attention backend disagrees with the dense reference on this device."""


@dataclass
class Comparison:
    backend: str
    errors: dict[str, float]        # relative error per compared tensor
    tolerance: float
    seconds: float

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.errors.items(), key=lambda item: item[1])

    @property
    def ok(self) -> bool:
        return self.worst[1] <= self.tolerance


def attention_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The model's first attention layer: anything with ``project``, ``pos`` and ``backend``."""
    for module in model.modules():
        if all(hasattr(module, name) for name in ("project", "pos", "backend")):
            return module
    raise ValueError(f"{type(model).__name__} has no attention layer (a module with project/pos/backend)")


def _case(layer, batch: int, seq_len: int, dtype: torch.dtype, seed: int):
    """A random input for ``layer`` from a private generator (the global RNG stays untouched)."""
    weight = next(layer.parameters())
    device = weight.device
    width = layer.c_q.in_features
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, seq_len, width, generator=g, device=device)
    grad_out = torch.randn(batch, seq_len, width, generator=g, device=device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    return x, grad_out, autocast


def compare(layer, backend: str, fn: Callable, x: Tensor, grad_out: Tensor, autocast,
            tolerance: float) -> Comparison:
    """``fn`` against the dense reference on one case: the output and the gradients of x and
    of every parameter of ``layer`` that the attention reaches."""
    params = [(name, p) for name, p in layer.named_parameters() if p.requires_grad]

    def run(attend):
        xl = x.detach().requires_grad_()
        with autocast:
            q, k, v = layer.project(xl)
            q, k, bias = layer.pos(xl, q, k, v=v)
            y = attend(q, k, v, bias)
            y = y.transpose(1, 2).reshape(xl.shape)
        grads = torch.autograd.grad(y, [xl, *(p for _, p in params)], grad_out.to(y.dtype), allow_unused=True)
        return [y, *grads]

    start = time.perf_counter()
    got = run(fn)
    if got[0].is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    want = run(dense_attention)
    errors = {}
    for name, a, b in zip(["output", "grad input", *(f"grad {n}" for n, _ in params)], got, want):
        if b is None or not b.norm():
            if a is not None and a.norm():
                errors[name] = float("inf")      # a gradient where the reference has none
            continue
        a = torch.zeros_like(b) if a is None else a
        errors[name] = ((a.double() - b.double()).norm() / b.double().norm()).item()
    return Comparison(backend, errors, tolerance, seconds)


def backends_in_use(layer, x: Tensor) -> list[str]:
    """The fast backends the layer's ``attn_backend`` resolves to for its encoding on x's
    device (training shapes: queries = keys)."""
    with torch.no_grad():
        q, k, v = layer.project(x[:, :2])
        q, k, bias = layer.pos(x[:, :2], q, k, v=v)
    backend = resolve_backend(q, bias, layer.backend)
    return [backend] if backend in CHECKED else []


def check_backends(model: torch.nn.Module, dtype: torch.dtype, backends: Optional[dict[str, Callable]] = None,
                   batch: int = 2, seq_len: int = 256, seed: int = 0, log=print) -> list[Comparison]:
    """Compare each fast backend (default: those the model uses here) and its fallback with
    the dense reference; raise BackendMismatch naming the backend and the fallback when one
    disagrees. ``backends`` maps names to attention functions (tests pass broken ones)."""
    layer = attention_layer(model)
    x, grad_out, autocast = _case(layer, batch, seq_len, dtype, seed)
    if backends is None:
        backends = {name: BACKENDS[name] for name in backends_in_use(layer, x)}
    tolerance = TOLERANCE_UNITS * UNIT_ROUNDOFF[dtype]
    results = []
    for name, fn in backends.items():
        result = compare(layer, name, fn, x, grad_out, autocast, tolerance)
        results.append(result)
        tensor, error = result.worst
        if result.ok:
            log(f"attention self-check: {name} matches the dense reference ({dtype}, worst relative "
                f"error {error:.2%} in {tensor}, tolerance {tolerance:.2%}, {result.seconds:.2f} s)")
            continue
        fallback = FALLBACK.get(name, "chunked")
        advice = ""
        if fallback in BACKENDS and fallback != "dense":
            checked = compare(layer, fallback, BACKENDS[fallback], x, grad_out, autocast, tolerance)
            advice = (f" ({fallback} matches it here)" if checked.ok else
                      f" ({fallback} disagrees too, worst {checked.worst[1]:.2%} in {checked.worst[0]}:"
                      f" use --attn_backend=dense)")
        raise BackendMismatch(
            f"attention backend {name!r} disagrees with the dense reference on "
            f"{x.device} in {dtype}: relative error {error:.2%} in {tensor} (tolerance {tolerance:.2%}; "
            f"all: {', '.join(f'{k} {v:.2%}' for k, v in result.errors.items())}). Train with "
            f"--attn_backend={fallback}{advice}, or skip this check with --check_backends=False.")
    return results
