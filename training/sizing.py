"""Size a training run before spending GPU hours: parameters, tokens and FLOPs per step, and
the peak memory per GPU, from the config alone.

    python train_adam_finewebedu.py config/paper/train_llama_mha_rope_medium_adam_80g8.py --dry_run=True --gpu=8xh100
    python -m scripts.check_sizing   # the estimate against peaks measured on CPU at small sizes

The model is built on the meta device (shapes only: no memory, no data, no out_dir). Memory
is a model of what training keeps, written out here and in ``layer_bytes_per_token``.

Per GPU, with N parameters (the tied embedding counted once), micro-batch B x T tokens:

    weights          4N   float32 master weights (bf16/fp16 autocast keeps them float32)
    AdamW state      8N   exp_avg and exp_avg_sq in float32
    DDP buckets      4N   with more than one rank: DDP's flat gradient buckets
    gradients        4N   float32: with gradient accumulation they live through every micro-step;
                          without, backward makes them as it frees the activations and
                          zero_grad(set_to_none=True) drops them, so they meet the
                          activations only at the ends: max(activations, gradients)
    weight copies    2N'  eager autocast only: the half-precision copy of each matmul weight
                          (N' parameters), kept from the forward to that layer's backward
    activations      B·T · n_layer · layer_bytes_per_token, + what the encoding keeps
                          (traced on the meta device), + the (B, H, T, T) tensors of the dense backend;
                          with activation checkpointing (--activation_checkpointing=True) each
                          block keeps only its float32 input, B·T · n_layer · 4C, and one block's
                          activations exist at a time, recomputed in its backward
    logits and loss  B·T · 12·vocab at the start of the backward, or, if larger, the
                          temporaries of the attention backward of one layer
    (tiny micro-batches: the gradients and the tied embedding's two gradients, 4N + 8·vocab·C,
    at the end of the backward make the peak instead)

The report lists the addends of the peak. On a GPU add the CUDA context and library
workspaces (CUDA_RESERVE_GIB) and keep headroom for the caching allocator's fragmentation
(FIT_FRACTION). ``python -m scripts.check_sizing`` prints the estimate next to measured CPU peaks;
tests/test_sizing.py requires them to agree within a factor (and on a GPU, the CUDA peaks).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from modeling.bias import PathIntegralBias, SeparableBias
from model import GPT, GPTConfig
from modeling import attention, grape_ap_cpu
from modeling.chunked import query_block
from training.configurator import model_fields

GIB = 2 ** 30

# Memory as nvidia-smi reports it, by the names --gpu accepts; the first field is the name
# torch.cuda.get_device_name() gives, which also finds the peak FLOP/s for the MFU.
GPUS = {
    "a100-40g": ("NVIDIA A100-SXM4-40GB", 40960 * 2 ** 20),
    "a100-80g": ("NVIDIA A100-SXM4-80GB", 81920 * 2 ** 20),
    "h100": ("NVIDIA H100 80GB HBM3", 81559 * 2 ** 20),
    "h100-nvl": ("NVIDIA H100 NVL", 95830 * 2 ** 20),
    "h200": ("NVIDIA H200", 143771 * 2 ** 20),
    "b200": ("NVIDIA B200", 183359 * 2 ** 20),
    "l40s": ("NVIDIA L40S", 46068 * 2 ** 20),
    "l4": ("NVIDIA L4", 23034 * 2 ** 20),
    "a10g": ("NVIDIA A10G", 23028 * 2 ** 20),
    "rtx4090": ("NVIDIA GeForce RTX 4090", 24564 * 2 ** 20),
}
CUDA_RESERVE_GIB = 1.0        # CUDA context, cuBLAS/cuDNN workspaces (not in torch's allocator)
NCCL_RESERVE_GIB = 0.5        # NCCL buffers with more than one rank
FIT_FRACTION = 0.9            # the caching allocator fragments: plan for 90% of the card
ASSUMED_MFU = 0.4             # only for the "time per iteration" line


@dataclass
class Target:
    """Where the run would train."""
    device_type: str           # 'cuda' or 'cpu'
    name: str                  # 'NVIDIA H100 80GB HBM3', 'CPU'
    memory: Optional[int]      # bytes per device (None: unknown)
    world_size: int
    source: str                # how it was found, for the report


@dataclass
class Estimate:
    parameters: int
    tokens_per_step: int           # global: batch_size * block_size * accumulation * world
    flops_per_token: float
    flops_formula: str
    backend: str                   # attention backend the run would use
    precision: str                 # 'float32' or 'bfloat16 autocast' ...
    compiled: bool
    memory: dict = field(default_factory=dict)   # component -> bytes (the breakdown)
    peak: int = 0                  # bytes per device, the model's peak
    per_sample: int = 0            # activation bytes per sequence of the micro-batch
    fixed: int = 0                 # peak minus the micro-batch-proportional part


# ----------------------------------------------------------------------------------------
# The memory model
# ----------------------------------------------------------------------------------------

def layer_bytes_per_token(C: int, F: int, act: int, compiled: bool, qk_norm: bool,
                          n_shift: int) -> float:
    """Activation bytes one transformer block keeps per token for its backward.

    C = n_embd, F = MLP width, act = bytes of a matmul output (4 in float32, 2 under
    bf16/fp16 autocast); RMSNorm works in float32 (4 bytes) either way.

    Eager (what autograd saves, op by op; counted from model.py):
      RMSNorm ln_1, ln_2: its float32 input and x·rsqrt            2 × 2·4·C
      attention input: float32 (shared by q, k, v) or a half copy per projection
                                                                   4·C | 3·act·C
      QK-RMSNorm of q and k: float32 input and x·rsqrt             2 × (4 + act)·C
      attention: q, k, v and output as an O(T) backend keeps them  4·act·C
      the heads' output made contiguous for c_proj                 act·C
      MLP input: float32, or a half copy per projection            4·C | 2·act·C
      MLP: fc1 output, silu(fc1), fc2 output, their product        4·act·F
      KV-shift, per shifted projection: previous and current       2·act·C
    Compiled (inductor's min-cut partitioner recomputes pointwise chains in the backward and
    keeps matmul inputs and outputs): the norms' float32 inputs 2·4·C, the attention and MLP
    inputs 2·act·C, q and k before QK-norm 2·act·C, q, k, v, output 4·act·C, c_proj's
    input act·C, fc1 and fc2 outputs and their product 3·act·F, KV-shift 2·act·C each.
    The encoding's own saved tensors come on top (encoding_bytes_per_token).
    """
    f = 4
    if compiled:
        return 2 * f * C + 2 * act * C + 2 * act * C + 4 * act * C + act * C + 3 * act * F + n_shift * 2 * act * C
    attn_in = f * C if act == f else 3 * act * C
    mlp_in = f * C if act == f else 2 * act * C
    qk = 2 * (f + act) * C if qk_norm else 0
    return (2 * 2 * f * C + attn_in + qk + 4 * act * C + act * C + mlp_in + 4 * act * F
            + n_shift * 2 * act * C)


def head_bytes_per_token(C: int, V: int, act: int) -> float:
    """The final norm, the logits and the loss, per token.

    At the start of the backward the log-softmax (kept for its backward), its gradient and
    the logits' gradient coexist: three float32 (B·T, V) tensors, eager or compiled (measured
    on CPU: inductor keeps float32 logits-sized tensors here too; under autocast the half
    gradient of the lm_head output comes after the first two are freed). The final RMSNorm
    keeps three C-vectors. Assumes the training loop drops the returned logits before the
    backward (it indexes the loss out of the model's output)."""
    return 3 * 4 * V + 2 * 4 * C + (4 if act == 4 else act) * C


def dense_bytes_per_score(bias_kind: str, act: int) -> tuple[float, float]:
    """Dense backend: bytes per (B, H, T, T) element that one layer keeps for backward, and
    that the layer in flight needs on top (its forward/backward temporaries). Counted from
    attention.dense_attention: the float32 softmax output is kept (plus a half copy for the
    probabilities @ v matmul under autocast); a bias adds its own (B, H, T, T) terms
    (GRAPE-A's content gates keep their broadcast slope, GRAPE-AP's ψ keeps z and its
    suffix sums). Temporaries: the gradients of the probabilities and of the logits."""
    kept = 4 + (act if act != 4 else 0)
    kept += {"none": 0, "separable": 0, "separable_gated": 2, "path_integral": 8}[bias_kind]
    return kept, 2 * 4


# ----------------------------------------------------------------------------------------
# What the model is: built on the meta device
# ----------------------------------------------------------------------------------------

def meta_model(model_config):
    with torch.device("meta"):
        return GPT(model_config)


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def encoding_trace(model, batch: int, T: int):
    """Run layer 0's positional encoding on meta tensors of the real shape and return
    (bytes its autograd keeps beyond q, k and x, the bias description it returns).

    Saved-tensor hooks see exactly what the encoding's ops keep for backward, so a new
    encoding is sized without touching this file. Traced in float32 (an upper bound for the
    few matmuls that autocast would run in half precision)."""
    attn = model.transformer.h[0].attn
    c = model.config
    with torch.device("meta"):
        x = torch.empty(batch, T, c.n_embd, requires_grad=True)
        q, k, v = (torch.empty(batch, c.n_head, T, c.head_dim, requires_grad=True) for _ in range(3))
    saved: dict[int, int] = {}

    def pack(t):
        saved.setdefault(_storage_id(t), t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, _, bias = attn.pos(x, q, k, v=v)
    own = {_storage_id(t) for t in [*attn.pos.parameters(), *attn.pos.buffers(), x]}
    kept = sum(n for sid, n in saved.items() if sid not in own)
    # the bias description's tensors (slopes, cumulative sums, probes) are kept by the backend
    if bias is not None:
        for t in vars(bias).values():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and _storage_id(t) not in saved:
                saved[_storage_id(t)] = t.untyped_storage().nbytes()
                kept += t.untyped_storage().nbytes()
    return kept, bias


def bias_kind(bias) -> str:
    if bias is None:
        return "none"
    if isinstance(bias, PathIntegralBias):
        return "path_integral"
    if isinstance(bias, SeparableBias):
        gated = any(t is not None and t.requires_grad for t in (bias.slope_q, bias.slope_k))
        return "separable_gated" if gated else "separable"
    return "separable"


def backend_for(model_config, bias, device_type: str, T: int) -> str:
    """The backend the run would use, as attention.attend would choose it on that device."""
    name = model_config.attn_backend
    if name != "auto":
        if name not in attention.BACKENDS:
            raise ValueError(f"unknown attn_backend {name!r}; choose one of {['auto', *attention.BACKENDS]}")
        return name if (bias is not None or name == "dense") else "sdpa"
    with torch.device("meta"):
        q = torch.empty(1, model_config.n_head, T, model_config.head_dim)
    return attention.choose_backend(q, bias, device_type)


# ----------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------

def estimate(model_config, batch_size: int, accumulation: int = 1, world_size: int = 1,
             device_type: str = "cuda", autocast: Optional[str] = "bfloat16", compiled: bool = True,
             model=None, activation_checkpointing: bool = False) -> Estimate:
    """Peak memory per device of training ``model_config`` with micro-batch ``batch_size``.
    ``autocast``: 'bfloat16' / 'float16' (mixed precision, float32 weights) or None (float32).
    ``activation_checkpointing``: blocks keep their input only and recompute the rest in backward."""
    c = model_config
    model = model if model is not None else meta_model(c)
    N = model.num_parameters_unique()
    B, T = batch_size, c.block_size
    half = autocast in ("bfloat16", "float16")
    act = 2 if half else 4
    precision = f"{autocast} autocast, float32 weights" if half else "float32"

    C, V, L = c.n_embd, c.vocab_size, c.n_layer
    F = model.transformer.h[0].mlp.c_fc1.out_features
    n_shift = int(c.use_k_shift) + int(c.use_v_shift)
    enc_bytes, bias = encoding_trace(model, B, T)
    backend = backend_for(c, bias, device_type, T)

    layer = B * T * layer_bytes_per_token(C, F, act, compiled, c.use_qk_rmsnorm, n_shift) + enc_bytes
    head = B * T * head_bytes_per_token(C, V, act)
    # the layer in flight in the backward needs temporaries; they come after the head's are gone
    transient, transient_per_sample = 0, 0
    if backend == "dense":
        kept, temp = dense_bytes_per_score(bias_kind(bias), act)
        scores = B * c.n_head * T * T
        layer += kept * scores
        transient = transient_per_sample = temp * scores
    elif backend == "chunked" and bias_kind(bias) == "path_integral":
        if device_type == "cpu" and not compiled and grape_ap_cpu.ops() is not None:
            # the fused kernel's backward: contiguous float32 copies of the output gradient, q, k,
            # v and both probes, their six gradients (one rescaled): ~12 (B, T, C) buffers; its
            # per-thread scratch is (keys x 16-query) rows, negligible
            transient = 12 * 4 * B * T * C
        else:
            # the tensor-op path's backward: float32 copies and gradients of q, k, v (~8 (B, T, C)
            # buffers) and three (B, H, block, T) float32 block temporaries
            block = min(T, query_block(B, c.n_head, T))
            transient = 8 * 4 * B * T * C + 3 * 4 * B * c.n_head * block * T
    layers = L * layer
    if activation_checkpointing:
        # kept: every block's float32 input; in flight: one block recomputed, with its temporaries
        layers = L * B * T * 4 * C
        transient, transient_per_sample = layer + transient, layer + transient_per_sample
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    copies = 2 * matmul_params if (half and not compiled) else 0

    # the addends of the peak (the breakdown sums to it)
    memory = {"weights (float32)": 4 * N, "AdamW state (2 x float32)": 8 * N}
    if world_size > 1:
        memory["DDP gradient buckets"] = 4 * N
    if accumulation > 1:
        memory["gradients, kept over the micro-steps"] = 4 * N
    in_flight = layers + copies + max(head, transient)
    # at the end of the backward the tied embedding's two gradients (lm_head's, embedding's)
    # meet and are summed: two (vocab, C) float32 temporaries on top of the gradients
    end_of_backward = 4 * N + 2 * 4 * V * C
    if accumulation > 1 or in_flight >= end_of_backward:
        if copies:
            memory["half-precision weight copies"] = copies
        if activation_checkpointing:
            memory[f"activations: {L} block inputs, {B} x {T} tokens"] = layers
        else:
            memory[f"activations of {L} layers, {B} x {T} tokens"] = layers
        if head >= transient:
            memory["logits and loss (3 float32 tokens x vocab arrays: log-softmax, 2 gradients)"] = head
        elif activation_checkpointing:
            memory["one block recomputed, with its temporaries"] = transient
        else:
            memory[f"{backend} attention temporaries of one layer"] = transient
    else:                                   # a tiny micro-batch: the gradients make the peak
        memory["gradients (float32) + 2 embedding gradients"] = end_of_backward
    peak = sum(memory.values())
    # what grows with the micro-batch (for the largest batch that fits)
    grows = "activations" in " ".join(memory)
    per_sample = (layers + max(head, transient_per_sample)) / B if grows else 0

    return Estimate(
        parameters=N, tokens_per_step=B * T * accumulation * world_size,
        flops_per_token=model.flops_per_token(),
        flops_formula="6N + 12·n_layer·n_head·head_dim·block_size (the training log's MFU)",
        backend=backend, precision=precision, compiled=compiled,
        memory=memory, peak=int(peak), per_sample=int(per_sample), fixed=int(peak - per_sample * B),
    )


# ----------------------------------------------------------------------------------------
# Targets and the report
# ----------------------------------------------------------------------------------------

def parse_gpu(text: str) -> tuple[int, str]:
    """'h100' -> (1, 'h100'); '8xh100' -> (8, 'h100')."""
    text = text.strip().lower()
    count, sep, name = text.partition("x")
    if sep and count.isdigit():
        n = int(count)
        if n < 1:
            from training.configurator import ConfigError
            raise ConfigError(f"config key 'gpu' = {text!r}: the GPU count must be at least 1")
        return n, name
    return 0, text


def find_target(cfg, environ=os.environ) -> Target:
    """The device the config would train on: a named GPU (cfg.gpu), else the detected one,
    else the CPU. World size: WORLD_SIZE (torchrun), else the count in cfg.gpu ('8xh100'),
    else the number of local GPUs."""
    count, name = parse_gpu(cfg.get("gpu", "") or "")
    world_env = environ.get("WORLD_SIZE")
    if name:
        if name not in GPUS:
            from training.configurator import ConfigError
            raise ConfigError(f"config key 'gpu': unknown GPU {name!r}; choose one of {sorted(GPUS)}, "
                              "optionally with a count: '8xh100'")
        full, memory = GPUS[name]
        world = int(world_env) if world_env else (count or 1)
        how = "WORLD_SIZE" if world_env else ("--gpu" if count else "one GPU (say --gpu=8x" + name + " for more)")
        return Target("cuda", full, memory, world, f"named with --gpu; world size from {how}")
    if cfg.get("device", "auto") != "cpu" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        world = int(world_env) if world_env else (count or torch.cuda.device_count())
        return Target("cuda", props.name, props.total_memory, world,
                      f"detected; world size from {'WORLD_SIZE' if world_env else 'the local GPUs'}")
    return Target("cpu", "CPU", _ram_bytes(), int(world_env) if world_env else (count or 1),
                  "no GPU detected (name one with --gpu=h100 to size a GPU run)")


def _ram_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# bf16 dense tensor-core peak FLOP/s; the first matching name fragment wins
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
]


def peak_flops(gpu_name: str) -> Optional[float]:
    """bf16 peak FLOP/s of a GPU by its name (None when unknown)."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in gpu_name), None)


def gpu_peak_flops(device: torch.device) -> Optional[float]:
    """The MFU's denominator for the device training runs on (None on CPU or an unknown GPU)."""
    return peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def verdict(est: Estimate, target: Target, batch_size: int) -> tuple[str, str]:
    """('fits' | 'tight' | 'does not fit' | 'unknown', a line of advice)."""
    if target.memory is None:
        return "unknown", "device memory unknown"
    reserve = 0
    if target.device_type == "cuda":
        reserve = int((CUDA_RESERVE_GIB + (NCCL_RESERVE_GIB if target.world_size > 1 else 0)) * GIB)
    need = est.peak + reserve
    budget = FIT_FRACTION * target.memory
    if need <= budget:
        word = "fits"
    elif need <= target.memory:
        word = "tight"
    else:
        word = "does not fit"
    advice = ""
    if word != "fits" and est.per_sample:
        largest = int((budget - reserve - est.fixed) // est.per_sample)
        advice = (f"largest micro-batch that fits: batch_size={largest}" if largest >= 1 else
                  "not even batch_size=1 fits: shorten block_size, use more GPUs or a bigger card")
        if largest >= 1:
            advice += " (raise gradient_accumulation_steps to keep the global batch)"
    return word, advice


def report(cfg, est: Estimate, target: Target) -> str:
    g = lambda b: f"{b / GIB:9.2f} GiB"
    B, T, accum = cfg["batch_size"], cfg["block_size"], cfg["gradient_accumulation_steps"]
    lines = [
        f"dry run: {cfg.get('pos_encoding')}, {cfg['n_layer']} layers, n_embd {cfg['n_embd']}, "
        f"{cfg['n_head']} heads of {est_head_dim(cfg)}, context {T}",
        f"  parameters          {est.parameters:,} ({est.parameters / 1e6:.1f}M, tied embedding counted once)",
        f"  tokens per step     {est.tokens_per_step:,} = batch_size {B} x block_size {T} x "
        f"accumulation {accum} x world size {target.world_size}",
        f"  FLOPs per token     {est.flops_per_token:.3e}  [{est.flops_formula}]",
        f"  target              {target.name} ({target.source})",
        f"  attention backend   {est.backend}; {est.precision}; "
        f"{'torch.compile' if est.compiled else 'eager'}",
        "  memory per device (estimate; the model of it: training/sizing.py):",
    ]
    width = max(46, *(len(name) + 2 for name in est.memory))
    for name, value in est.memory.items():
        lines.append(f"    {name:{width}s}{g(value)}")
    lines.append(f"    {'peak (the sum)':{width}s}{g(est.peak)}")
    if target.memory is not None:
        word, advice = verdict(est, target, B)
        extra = (f" + {CUDA_RESERVE_GIB + (NCCL_RESERVE_GIB if target.world_size > 1 else 0):.1f} GiB "
                 "CUDA context/workspaces" if target.device_type == "cuda" else "")
        lines.append(f"  fits {target.name} ({target.memory / GIB:.1f} GiB)? {word}: peak{extra} "
                     f"against {FIT_FRACTION:.0%} of the memory")
        if advice:
            lines.append(f"  {advice}")
    if target.device_type == "cuda":
        peak = peak_flops(target.name)
        if peak:
            step = est.flops_per_token * B * T * accum / (ASSUMED_MFU * peak)
            recompute = ""
            if cfg.get("activation_checkpointing"):       # the forward runs twice: 8N instead of 6N
                step, recompute = step * 4 / 3, ", x4/3 for the recomputed forward"
            lines.append(f"  time per iteration  {step:.2f} s at an assumed {ASSUMED_MFU:.0%} MFU{recompute} "
                         f"({cfg['max_iters']} iterations: {step * cfg['max_iters'] / 3600:.1f} h)")
    return "\n".join(lines)


def est_head_dim(cfg) -> int:
    return cfg.get("head_dim") or cfg["n_embd"] // cfg["n_head"]


def dry_run(cfg) -> tuple[str, Estimate, Target]:
    """What ``--dry_run=True`` prints: the training config sized for its target."""
    model_config = GPTConfig(**{k: cfg[k] for k in model_fields()})
    target = find_target(cfg)
    autocast = cfg["dtype"] if target.device_type == "cuda" and cfg["dtype"] != "float32" else None
    options = dict(device_type=target.device_type, autocast=autocast,
                   compiled=bool(cfg["compile"]) and not cfg.get("bitwise_deterministic", False))
    est = estimate(model_config, cfg["batch_size"], cfg["gradient_accumulation_steps"], target.world_size,
                   activation_checkpointing=bool(cfg.get("activation_checkpointing")), **options)
    text = report(cfg, est, target)
    if not cfg.get("activation_checkpointing") and target.memory is not None:
        checkpointed = estimate(model_config, cfg["batch_size"], cfg["gradient_accumulation_steps"],
                                target.world_size, activation_checkpointing=True, **options)
        text += "\n" + checkpointing_line(checkpointed, target, cfg["batch_size"])
    return text, est, target


def checkpointing_line(est: Estimate, target: Target, batch_size: int) -> str:
    """What --activation_checkpointing=True would change: its peak, and whether it fits."""
    word, advice = verdict(est, target, batch_size)
    line = (f"  with --activation_checkpointing=True (each block recomputed in backward, ~1/3 more compute): "
            f"peak {est.peak / GIB:.2f} GiB: {word}")
    return line + (f"; {advice}" if advice else "")


# ----------------------------------------------------------------------------------------
# Measuring (for --check and tests/test_sizing.py)
# ----------------------------------------------------------------------------------------

def measure_peak(model_config, batch_size: int, accumulation: int = 1, autocast: Optional[str] = None,
                 compiled: bool = False, device: str = "cpu", seed: int = 0,
                 activation_checkpointing: bool = False) -> int:
    """Peak bytes held by torch's allocator during one training step as
    train_adam_finewebedu.py takes it (micro-steps under autocast, backward, clipping, fused
    AdamW, zero_grad(set_to_none=True)), after a warm-up step that compiles and creates the
    AdamW state. CUDA: torch.cuda.max_memory_allocated. CPU: torch.profiler reports every
    allocation with the allocator's running total since profiling began; the peak of that
    plus the weights and AdamW state already allocated is the step's peak."""

    torch.manual_seed(seed)
    dev = torch.device(device)
    model = GPT(model_config).to(dev)
    model.set_activation_checkpointing(activation_checkpointing)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.01), lr=1e-4, fused=True)
    run = torch.compile(model) if compiled else model
    V, T = model_config.vocab_size, model_config.block_size
    data = torch.randint(0, V, (accumulation, batch_size, T + 1), device=dev)
    amp = (torch.autocast(dev.type, dtype=getattr(torch, autocast)) if autocast
           else torch.autocast(dev.type, enabled=False))

    def step():
        for micro in range(accumulation):
            with amp:
                loss = run(data[micro, :, :-1], data[micro, :, 1:])[1]    # the logits go at once
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    held = {}
    for t in [*model.parameters(), *model.buffers(), data,
              *(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))]:
        held[_storage_id(t)] = t.untyped_storage().nbytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)
    totals = [n.extra_fields.total_allocated for n in walk(prof.profiler.kineto_results.experimental_event_tree())
              if n.tag == _EventType.Allocation]
    return sum(held.values()) + max([0, *totals])


CHECKS = [   # (what it stresses, GPTConfig fields, batch, accumulation, autocast)
    ("activations", dict(pos_encoding="rope"), 4, 1, None),
    ("bf16 autocast", dict(pos_encoding="rope"), 4, 1, "bfloat16"),
    ("GRAPE-AP block loop", dict(pos_encoding="grape_ap"), 4, 1, None),
    ("separable bias, bf16", dict(pos_encoding="alibi"), 4, 1, "bfloat16"),
    ("dense T² path", dict(pos_encoding="rope", attn_backend="dense"), 4, 1, None),
    ("KV-shift, accumulation", dict(pos_encoding="grape_m", use_k_shift=True, use_v_shift=True), 2, 2, None),
    ("logits (GPT-2 vocabulary)", dict(pos_encoding="rope", vocab_size=50304), 2, 1, None),
]


def check(compiled: bool, device: str) -> str:
    """The estimate next to measured peaks for CHECKS (2 layers, n_embd 256, 4 heads, T 512)."""
    lines = [f"{'stresses':28s} {'encoding':10s} {'precision':9s} {'estimate':>10s} {'measured':>10s} {'ratio':>6s}"]
    for what, fields, B, accum, amp in CHECKS:
        base = dict(n_layer=2, n_embd=256, n_head=4, block_size=512, vocab_size=1024)
        config = GPTConfig(**{**base, **fields})
        est = estimate(config, B, accum, device_type=device, autocast=amp, compiled=compiled)
        got = measure_peak(config, B, accum, amp, compiled, device)
        lines.append(f"{what:28s} {config.pos_encoding:10s} {amp or 'float32':9s} {est.peak / 2**20:7.1f} MiB "
                     f"{got / 2**20:7.1f} MiB {got / est.peak:6.2f}")
        print(lines[-1], flush=True)
    return "\n".join(lines)
