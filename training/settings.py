"""The training settings: every key a config file or ``--key=value`` may set, its default, and
the checks of values that type-check but cannot run.

Model keys (n_layer, pos_encoding, p_head_dim, use_k_shift, ...) are ``GPTConfig``'s fields and
take its defaults, except the paper's medium size set here; the rest are below. Config files
override these defaults and ``--key=value`` overrides the files (``configurator.py``).
``gradient_accumulation_steps`` and ``batch_size`` are per rank: the global batch is
batch_size * gradient_accumulation_steps * WORLD_SIZE sequences of block_size tokens.
"""
from __future__ import annotations

import math

from model import GPT, GPTConfig
from modeling.attention import backend_choices
from training.configurator import ConfigError, model_fields, types_of

TRAIN_DEFAULTS = dict(
    # I/O
    out_dir="out",
    init_from="scratch",          # 'scratch' or 'resume' (from resume_dir, default out_dir)
    resume_dir="",
    overwrite_out_dir=False,      # start from scratch in an out_dir that holds a run (else refused)
    eval_interval=1000,           # evaluate and checkpoint every this many iterations
    log_interval=10,
    eval_iters=200,               # validation batches per evaluation
    eval_only=False,
    always_save_checkpoint=True,  # else only when the validation loss improves
    trust_checkpoint_pickle=False,  # resume from a checkpoint of an earlier version (unpickling it can run code)
    progress=True,                # tqdm bar when stderr is a terminal
    # wandb
    wandb_log=False,
    wandb_project="grape",
    wandb_run_name="",            # default: derived from model and out_dir
    wandb_mode="",                # 'online', 'offline' (no network needed) or '' = wandb's default
    # data: {data_path}/{dataset}/{train,val}_*.bin unless data_dir is given
    data_path="data",
    dataset="fineweb-edu/fineweb-edu100B",   # where data/fineweb-edu/prepare.py writes
    data_dir="",
    batch_size=20,                # micro-batch per rank
    gradient_accumulation_steps=3,
    data_rng_mode="stateless",    # 'stateless': batch = f(data_seed, rank, step, micro); 'stateful': RNG stream, checkpointed
    seed=1337,                    # model init
    data_seed=-1,                 # -1: the value of seed (as in the original)
    eval_seed=-1,
    # model
    model_type="",                # the original repository's names, e.g. 'llama-mha-grape-ap-v1'
    # optimizer (AdamW)
    learning_rate=1e-3,
    max_iters=25000,
    weight_decay=0.01,
    weight_decay_on="all_but_norms",   # the original's groups; 'matrices': >= 2-dim parameters only (GPT.optimizer_groups)
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,                # 0 disables clipping
    decay_lr=True,                # cosine decay after linear warm-up; False: constant learning_rate
    warmup_iters=2000,
    lr_decay_iters=25000,         # default: max_iters
    min_lr=3e-5,
    schedule="cosine",
    # divergence (non-finite loss or gradient norm); see divergence.py
    on_divergence="stop",         # 'stop': exit 1, checkpoints untouched; 'rollback': last checkpoint, skip, lower lr
    rollback_lr_factor=0.5,       # learning rate multiplier at each rollback
    max_rollbacks=3,              # then stop
    # system
    device="auto",                # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype="bfloat16",             # autocast dtype on GPU: 'bfloat16', 'float16' (GradScaler) or 'float32'; CPU trains in float32
    compile=True,                 # torch.compile the model
    activation_checkpointing=False,  # recompute each block in backward: ~1/10 of the activation memory, ~1/3 more compute
    backend="auto",               # DDP backend: 'nccl' on GPU, 'gloo' on CPU
    deterministic=False,          # deterministic kernels
    bitwise_deterministic=False,  # + no compile, no TF32, SDPA math kernel: exact repeats on the same hardware
    check_backends=True,          # on CUDA, compare the fast attention backends with the dense reference first
    gpu_peak_flops=0.0,           # for MFU; 0 = look the GPU up in PEAK_BF16_FLOPS
    # sizing (sizing.py)
    dry_run=False,                # print parameters, tokens/FLOPs per step, peak memory per GPU; then stop
    gpu="",                       # dry run for a named GPU, e.g. 'h100' or '8xh100'; '' = the detected one
)
# the original training script's model defaults (its p_head_dim None means head_dim)
MODEL_DEFAULT_OVERRIDES = dict(n_layer=24, n_head=8, n_embd=1024, head_dim=128, block_size=4096, p_head_dim=None)


def defaults() -> tuple[dict, dict]:
    """All keys with their default values, and the types each key accepts."""
    fields = model_fields()
    clash = set(fields) & set(TRAIN_DEFAULTS)
    assert not clash, f"training keys shadow GPTConfig fields: {clash}"
    values = {**TRAIN_DEFAULTS, **{k: d for k, (d, _) in fields.items()}, **MODEL_DEFAULT_OVERRIDES}
    accepted = {**types_of(TRAIN_DEFAULTS), **{k: t for k, (_, t) in fields.items()}}
    return values, accepted



def derive_defaults(cfg, explicit: set[str]) -> None:
    """Defaults that follow other keys: lr_decay_iters is max_iters unless set."""
    if "lr_decay_iters" not in explicit:
        cfg.lr_decay_iters = cfg.max_iters


def validate(cfg, explicit: set[str] = frozenset()) -> None:
    """Values that type-check but cannot run."""
    choices = dict(init_from=("scratch", "resume"), data_rng_mode=("stateless", "stateful"),
                   dtype=("bfloat16", "float16", "float32"), backend=("auto", "nccl", "gloo"),
                   schedule=("cosine",), weight_decay_on=GPT.WEIGHT_DECAY_POLICIES,
                   on_divergence=("stop", "rollback"), attn_backend=backend_choices())
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {allowed}, got {cfg[key]!r}")
    for key in ("batch_size", "gradient_accumulation_steps", "block_size", "eval_interval",
                "log_interval", "eval_iters"):
        if cfg[key] < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {cfg[key]}")
    # what AdamW and the schedule would refuse later, or silently misuse
    for key in ("max_iters", "warmup_iters", "learning_rate", "min_lr", "weight_decay", "grad_clip", "max_rollbacks"):
        if cfg[key] < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {cfg[key]}")
    for key in ("beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            raise ConfigError(f"config key {key!r} must be in [0, 1), got {cfg[key]}")
    if not 0 < cfg.rollback_lr_factor <= 1:
        raise ConfigError(f"config key 'rollback_lr_factor' must be in (0, 1], got {cfg.rollback_lr_factor}")
    if cfg.decay_lr and cfg.lr_decay_iters <= cfg.warmup_iters and not cfg.eval_only and cfg.max_iters > 0:
        source = "" if "lr_decay_iters" in explicit else ", from max_iters"
        raise ConfigError(f"config key 'lr_decay_iters' ({cfg.lr_decay_iters}{source}) must exceed "
                          f"'warmup_iters' ({cfg.warmup_iters})")


def model_config_from(values: dict) -> GPTConfig:
    """GPTConfig(**values); a setting the model cannot run with is a ConfigError."""
    try:
        return GPTConfig(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def get_lr(it: int, cfg) -> float:
    """Linear warm-up to learning_rate, cosine decay to min_lr at lr_decay_iters, then flat."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)
