"""GRAPE-AP attention on CPU as one fused C++ kernel (grape_ap_cpu.cpp), built on first use.

The tensor-op path in chunked.py makes about a dozen passes over every (query block
x keys) matrix (the probe product, log-sigmoid, cumsum, slope, softmax, and their backward),
each a trip through memory; at T = 4096 they cost as much again as the attention GEMMs. The
kernel does the path integral, the softmax statistics and the probe gradients in one pass over
each block's keys, in vectors of 16 queries, and leaves the five q/k/v products to BLAS
(``at::mm``), so GRAPE-AP costs little more than RoPE's fused SDPA (results/BENCHMARKS.md "Attention
(CPU)"). The maths is SPEC §4's; the kernel's header comment says how it stays exactly causal.

``ops()`` builds the kernel once per machine (torch.utils.cpp_extension; 12 s on a 2-core Xeon,
cached by torch under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) for
the CPU's vector width, and returns None where it cannot: no C++ compiler or ninja, a torch
build without the headers, ``GRAPE_AP_CPU_KERNEL=0`` in the environment, or the source file
missing (a checkpoint folder that shipped only the .py files). Callers then use the tensor-op
path, which computes the same function. The kernel is float32 and runs outside torch.compile
(a traced graph keeps the tensor-op path, which Dynamo sees through).
"""
from __future__ import annotations

import math
import os
import sys
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grape_ap_cpu.cpp")
SWITCH = "GRAPE_AP_CPU_KERNEL"          # "0": never build or use the kernel

# compiler flags per torch CPU capability: at::vec's vector types follow CPU_CAPABILITY_*
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def ops():
    """``torch.ops.grape_ap_cpu`` (forward, backward), or None where the kernel cannot run."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    with _lock:
        if "ops" not in _loaded:
            _loaded["ops"] = _build()
    return _loaded["ops"]


def _build():
    if not os.path.isfile(SOURCE):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ISA_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])
    name = f"grape_ap_cpu_{capability.lower()}"
    try:
        from torch.utils import cpp_extension
        built = os.path.join(cpp_extension._get_build_directory(name, verbose=False), f"{name}.so")
        if not os.path.exists(built):        # a compile ahead, not a load from the cache: say why it waits
            print(f"(CPU kernels for biased attention (GRAPE-AP, denormal flush): compiling {name} once for "
                  "this machine, about 15 s)", file=sys.stderr, flush=True)
        cpp_extension.load(name=name, sources=[SOURCE], extra_cflags=["-O3", "-fopenmp", *flags],
                           extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as e:          # no compiler, no ninja, headers missing: the tensor-op path serves
        warnings.warn(f"GRAPE-AP CPU kernel unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "using the tensor-op path", stacklevel=3)
        return None
    return torch.ops.grape_ap_cpu


def flush_denormals_in_workers() -> bool:
    """Flush-to-zero in every thread of torch's intra-op pool, not only the caller's (what
    ``torch.set_flush_denormal`` reaches): SDPA's chunks on the other threads otherwise compute
    with the denormal softmax weights of far keys, which made ALiBi's training step 1.8x RoPE's
    at T = 4096 on 2 threads (1.04x flushed). False where the kernel cannot build."""
    kernel = ops()
    return kernel is not None and kernel.flush_denormals_in_workers() > 0


def serves(q: Tensor, p: Tensor) -> bool:
    """Whether the kernel takes this call: CPU tensors, eager mode, and the kernel built."""
    return (q.device.type == "cpu" and p.device.type == "cpu" and not torch.compiler.is_compiling()
            and ops() is not None)


def _operands(q, k, v, p, r, slope):
    """What the kernel reads: contiguous float32 q, k, v, p/d_p, r, slopes. The kernel reads any
    layout with unit stride along the head dim, but its GEMMs on the model's transposed views ran
    15% slower than on these copies, which cost a few ms and are freed after the call."""
    f = lambda t: t.detach().float().contiguous()     # the threads of its parallel loops record no autograd graph
    return (f(q), f(k), f(v), f(p / p.shape[-1]), f(r), f(slope))


class GrapeApCpu(torch.autograd.Function):
    """softmax(q·k/√d + b) v with b the GRAPE-AP path integral; saves q, k, v, p, r, the output
    and a logsumexp per query, and recomputes each block in backward."""

    @staticmethod
    def forward(ctx, q, k, v, p, r, slope):
        out, lse = ops().forward(*_operands(q, k, v, p, r, slope), 1.0 / math.sqrt(q.shape[-1]))
        ctx.save_for_backward(q, k, v, p, r, slope, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, p, r, slope, out, lse = ctx.saved_tensors
        dq, dk, dv, dp, dr, dslope = ops().backward(grad_out.detach().float().contiguous(), *_operands(q, k, v, p, r, slope), out, lse,
                                                    1.0 / math.sqrt(q.shape[-1]), ctx.needs_input_grad[5])
        grads = (dq, dk, dv, dp / p.shape[-1], dr, dslope)
        inputs = (q, k, v, p, r, slope)
        return tuple(g.to(t.dtype) if ctx.needs_input_grad[i] else None
                     for i, (g, t) in enumerate(zip(grads, inputs)))


def grape_ap_cpu_attention(q: Tensor, k: Tensor, v: Tensor, p: Tensor, r: Tensor, slope: Tensor) -> Tensor:
    """The kernel for (B, H, Tq, D) queries at the end of Tk keys; call ``serves`` first."""
    return GrapeApCpu.apply(q, k, v, p, r, slope)


def status() -> Optional[str]:
    """Which kernel is loaded ('grape_ap_cpu_avx512', ...), or None."""
    return f"grape_ap_cpu_{torch.backends.cpu.get_cpu_capability().lower()}" if ops() is not None else None
