"""Pretrain a LLaMA-style GPT with AdamW; the positional encoding is a config choice.

Single process (CPU or one GPU):
    python train_adam_finewebedu.py config/train_cpu_grape_ap.py
DDP on all GPUs of a node:
    torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py \
        config/train_llama_mha_rope_medium_adam_80g8.py --seed=42 --data_seed=42 --eval_seed=42
Resume exactly where a run stopped (crash, SIGKILL, SIGTERM pre-emption):
    python train_adam_finewebedu.py config/... --init_from=resume

Defaults below (the paper's medium RoPE run), overridden by config files and then by
``--key=value`` (configurator.py; an unknown key or a wrongly typed value stops the run).
``gradient_accumulation_steps`` and ``batch_size`` are per rank: the global batch is
batch_size * gradient_accumulation_steps * WORLD_SIZE sequences of block_size tokens.
"""
from __future__ import annotations

import gc
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import clean_state_dict, load_checkpoint, save_checkpoint
from configurator import ConfigError, configure, model_fields, types_of
from model import GPT, GPTConfig
from shards import ShardError

# -----------------------------------------------------------------------------------------
# Defaults. Model keys (n_layer, pos_encoding, p_head_dim, use_k_shift, ...) are GPTConfig's
# fields and take GPTConfig's defaults, except the paper's medium size set here.
TRAIN_DEFAULTS = dict(
    # I/O
    out_dir="out",
    init_from="scratch",          # 'scratch' or 'resume' (from resume_dir, default out_dir)
    resume_dir="",
    eval_interval=1000,           # evaluate and checkpoint every this many iterations
    log_interval=10,
    eval_iters=200,               # validation batches per evaluation
    eval_only=False,
    always_save_checkpoint=True,  # else only when the validation loss improves
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
    data_seed=1337,
    eval_seed=1337,
    # model
    model_type="",                # the original repository's names, e.g. 'llama-mha-grape-ap-v1'
    # optimizer (AdamW; weight decay on matrices only)
    learning_rate=1e-3,
    max_iters=25000,
    weight_decay=0.01,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,                # 0 disables clipping
    decay_lr=True,                # cosine decay after linear warm-up; False: constant learning_rate
    warmup_iters=2000,
    lr_decay_iters=25000,
    min_lr=3e-5,
    schedule="cosine",
    # system
    device="auto",                # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype="bfloat16",             # autocast dtype on GPU: 'bfloat16', 'float16' (GradScaler) or 'float32'; CPU trains in float32
    compile=True,                 # torch.compile the model
    backend="auto",               # DDP backend: 'nccl' on GPU, 'gloo' on CPU
    deterministic=False,          # deterministic kernels
    bitwise_deterministic=False,  # + no compile, no TF32, SDPA math kernel: exact repeats on the same hardware
    gpu_peak_flops=0.0,           # for MFU; 0 = look the GPU up in PEAK_BF16_FLOPS
    # sizing (sizing.py)
    dry_run=False,                # print parameters, tokens/FLOPs per step, peak memory per GPU; then stop
    gpu="",                       # dry run for a named GPU, e.g. 'h100' or '8xh100'; '' = the detected one
)
MODEL_DEFAULT_OVERRIDES = dict(n_layer=24, n_head=8, n_embd=1024, head_dim=128, block_size=4096)


def defaults() -> tuple[dict, dict]:
    """All keys with their default values, and the types each key accepts."""
    fields = model_fields()
    clash = set(fields) & set(TRAIN_DEFAULTS)
    assert not clash, f"training keys shadow GPTConfig fields: {clash}"
    values = {**TRAIN_DEFAULTS, **{k: d for k, (d, _) in fields.items()}, **MODEL_DEFAULT_OVERRIDES}
    accepted = {**types_of(TRAIN_DEFAULTS), **{k: t for k, (_, t) in fields.items()}}
    return values, accepted


# bf16 dense tensor-core peak FLOP/s; the first matching name fragment wins
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
]


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def validate(cfg) -> None:
    """Values that type-check but cannot run."""
    choices = dict(init_from=("scratch", "resume"), data_rng_mode=("stateless", "stateful"),
                   dtype=("bfloat16", "float16", "float32"), backend=("auto", "nccl", "gloo"),
                   schedule=("cosine",))
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {allowed}, got {cfg[key]!r}")
    for key in ("batch_size", "gradient_accumulation_steps", "block_size", "eval_interval",
                "log_interval", "eval_iters"):
        if cfg[key] < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {cfg[key]}")
    if cfg.max_iters < 0 or cfg.warmup_iters < 0:
        raise ConfigError("config keys 'max_iters' and 'warmup_iters' must be >= 0")
    if cfg.decay_lr and cfg.lr_decay_iters <= cfg.warmup_iters:
        raise ConfigError(f"config key 'lr_decay_iters' ({cfg.lr_decay_iters}) must exceed "
                          f"'warmup_iters' ({cfg.warmup_iters})")


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


def flops_per_token(model: GPT) -> float:
    """nanoGPT's estimate (PaLM appendix B): 6N for the matmuls + 12·L·C·T for attention."""
    c = model.config
    return 6 * model.num_parameters_unique() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size


def rank_state(train_batches) -> dict:
    """Everything random that belongs to one rank, for exact resumption."""
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "data": train_batches.state_dict(),
    }


def restore_rank_state(state: dict, train_batches) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    train_batches.load_state_dict(state["data"])


class JsonlLog:
    """out_dir/log.jsonl, one JSON object per line, appended (a resume keeps the history)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    values, accepted = defaults()
    cfg, explicit = configure(argv, values, accepted)
    validate(cfg)
    if cfg.dry_run:                     # size the run and stop: no device, data or out_dir is touched
        from sizing import dry_run
        text, estimate, _ = dry_run(cfg)
        print(text)
        return {"dry_run": estimate}
    from dataloader import TokenBatches   # imported late: the data module is optional for --help-like uses

    # -- processes and devices ------------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=backend)
    else:
        rank, local_rank, world = 0, 0, 1
        name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(name)
    master = rank == 0
    device_type = device.type

    # -- determinism ----------------------------------------------------------------------
    if cfg.bitwise_deterministic:
        cfg.deterministic, cfg.compile = True, False
    was_deterministic = torch.are_deterministic_algorithms_enabled()   # restored on return
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before the first cuBLAS call
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = not cfg.bitwise_deterministic
    torch.backends.cudnn.allow_tf32 = not cfg.bitwise_deterministic
    if cfg.bitwise_deterministic and device_type == "cuda":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_math_sdp(True)

    dtype = cfg.dtype if device_type == "cuda" else "float32"
    if device_type != "cuda" and "dtype" in explicit and cfg.dtype != "float32" and master:
        print(f"note: dtype={cfg.dtype!r} applies to GPUs; training on {device} in float32")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = (torch.autocast(device_type=device_type, dtype=ptdtype)
                if device_type == "cuda" and dtype != "float32" else nullcontext())

    # -- model, optimizer, state ------------------------------------------------------------
    resume_from = cfg.resume_dir or cfg.out_dir
    resuming = cfg.init_from == "resume"
    ckpt = load_checkpoint(resume_from, map_location="cpu") if resuming else None
    if ckpt is not None:
        model_config = GPTConfig(**ckpt["model_config"])
        if "attn_backend" in explicit:            # a kernel choice, not a parameter: may change
            model_config.attn_backend = cfg.attn_backend
        differing = [f"{k}={cfg[k]!r} (checkpoint: {getattr(model_config, k)!r})" for k in model_fields()
                     if k in explicit and k != "attn_backend" and getattr(model_config, k) != cfg[k]]
        if differing:
            # a different model would silently replace the one asked for; the checkpoint is untouched
            raise ConfigError(f"cannot resume from {resume_from}: its model was trained with other settings: "
                              f"{', '.join(differing)}. Resume with the config it was trained with, or start "
                              f"a new run in another out_dir")
        for k in model_fields():
            cfg[k] = getattr(model_config, k)
    else:
        model_config = GPTConfig(**{k: cfg[k] for k in model_fields()})
    torch.manual_seed(cfg.seed)
    raw_model = GPT(model_config).to(device)
    if ckpt is not None:
        raw_model.load_state_dict(clean_state_dict(ckpt["model"]))
    optimizer = torch.optim.AdamW(raw_model.optimizer_groups(cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                  fused=device_type in ("cuda", "cpu"))   # one kernel: much faster than foreach
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    iter_num, best_val_loss, wandb_id = 0, float("inf"), None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt.get("best_val_loss", float("inf"))
        wandb_id = ckpt.get("wandb_id")
    model = torch.compile(raw_model) if cfg.compile else raw_model
    eval_model = model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    # -- data -------------------------------------------------------------------------------
    data_dir = cfg.data_dir or os.path.join(cfg.data_path, cfg.dataset)
    B, T, accum = cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps
    # stateless: rank r's micro-step m reads the step's global micro-batch r * accum + m, so the
    # global batch of a step is the same however it is split over ranks (and a run on 2 ranks
    # equals one on 1 rank with twice the accumulation). stateful: one RNG stream per rank.
    stateless = cfg.data_rng_mode == "stateless"
    train_batches = TokenBatches(data_dir, "train", B, T, rank=0 if stateless else rank,
                                 world_size=1 if stateless else world, seed=cfg.data_seed,
                                 mode=cfg.data_rng_mode)
    val_batches = TokenBatches(data_dir, "val", B, T, seed=cfg.eval_seed, mode="stateless")
    first_micro = rank * accum if stateless else 0
    if ckpt is not None:
        states = ckpt.get("rank_states") or []
        if len(states) != world:
            if cfg.data_rng_mode == "stateful":
                raise ValueError(f"checkpoint was written by {len(states)} rank(s), this run has {world}; "
                                 "data_rng_mode='stateful' resumes only with the same WORLD_SIZE")
        else:
            restore_rank_state(states[rank], train_batches)
        del ckpt, states                         # a CPU copy of model + optimizer: free it
    tokens_per_iter = B * T * accum * world

    def to_device(x, y):
        if device_type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def all_mean(value: torch.Tensor) -> torch.Tensor:
        if ddp:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / world
        return value

    @torch.no_grad()
    def estimate_val_loss() -> float:
        eval_model.eval()
        total = torch.zeros((), device=device, dtype=torch.float64)
        for k in tqdm_range(cfg.eval_iters, show and cfg.eval_iters >= 20, "val"):
            x, y = to_device(*val_batches.get(k, rank))   # the same batches at every evaluation
            with autocast:
                _, loss = eval_model(x, y)
            total += loss.double()
        eval_model.train()
        return all_mean(total / cfg.eval_iters).item()

    def save(iter_num: int) -> None:
        states = [rank_state(train_batches)]
        if ddp:
            states = [None] * world
            dist.all_gather_object(states, rank_state(train_batches))
        if not master:
            return
        state = {
            "model": clean_state_dict(raw_model.state_dict()),
            "model_config": raw_model.config.to_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "tokens": iter_num * tokens_per_iter,
            "config": dict(cfg),
            "world_size": world,
            "rank_states": states,
            "wandb_id": wandb_id,
        }
        save_checkpoint(cfg.out_dir, state, raw_model)
        say(f"saved checkpoint at iter {iter_num} to {cfg.out_dir}")

    # -- logging ----------------------------------------------------------------------------
    show = master and cfg.progress and sys.stderr.isatty()
    bar = None

    def say(msg: str) -> None:
        if master:
            (bar.write if bar is not None else print)(msg)

    log, wandb_run = None, None
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        log = JsonlLog(os.path.join(cfg.out_dir, "log.jsonl"))
        if not resuming and not cfg.eval_only:
            if os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")):
                print(f"note: training from scratch in {cfg.out_dir}; its checkpoint will be replaced "
                      "(use --init_from=resume to continue it)")
            open(log.path, "w").close()        # a new run starts a new log; a resume appends
        n_params = raw_model.num_parameters_unique()
        print(f"model: {model_config.pos_encoding}, {model_config.n_layer} layers, n_embd {model_config.n_embd}, "
              f"{n_params / 1e6:.2f}M parameters; {world} rank(s) on {device}, {dtype}; "
              f"{tokens_per_iter:,} tokens per iteration; data {data_dir}")
        if cfg.wandb_log:
            import wandb
            wandb_run = wandb.init(project=cfg.wandb_project, config=dict(cfg), dir=cfg.out_dir,
                                   name=cfg.wandb_run_name or f"{model_config.pos_encoding}-{os.path.basename(cfg.out_dir.rstrip('/'))}",
                                   mode=cfg.wandb_mode or None, id=wandb_id, resume="allow")
            wandb_id = wandb_run.id
    peak = cfg.gpu_peak_flops or gpu_peak_flops(device)
    flops_per_iter_rank = flops_per_token(raw_model) * B * T * accum

    # -- SIGTERM (cluster pre-emption): checkpoint at the next step boundary, exit 0 ---------
    stop = {"requested": False}
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    def stop_requested() -> bool:
        flag = torch.tensor(float(stop["requested"]), device=device)
        return bool(all_mean(flag).item() > 0) if ddp else stop["requested"]

    # -- training loop ------------------------------------------------------------------------
    start_iter = iter_num
    val_loss = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_iters, initial=iter_num, unit="it", dynamic_ncols=True)
    interval_loss, interval_steps = torch.zeros((), device=device), 0
    t0 = time.time()
    try:
        while True:
            if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters or cfg.eval_only:
                val_loss = estimate_val_loss()
                say(f"iter {iter_num}: val loss {val_loss:.4f}")
                if master:
                    log.write(iter=iter_num, tokens=iter_num * tokens_per_iter, val_loss=val_loss)
                    if wandb_run is not None:
                        wandb_run.log({"val/loss": val_loss, "tokens": iter_num * tokens_per_iter}, step=iter_num)
                improved = val_loss < best_val_loss
                best_val_loss = min(best_val_loss, val_loss)
                if iter_num > start_iter and (improved or cfg.always_save_checkpoint):
                    save(iter_num)
                t0 = time.time()                      # tokens/s measures training only
            if cfg.eval_only or iter_num >= cfg.max_iters:
                break

            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = to_device(*train_batches.get(iter_num, first_micro + micro))
                # all-reduce gradients only on the last micro-step
                sync = nullcontext() if (not ddp or micro == accum - 1) else model.no_sync()
                with sync:
                    with autocast:
                        loss = model(x, y)[1]   # drop the float32 logits now, not after the backward
                    loss = loss / accum
                    scaler.scale(loss).backward()
                step_loss += loss.detach()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            interval_loss += step_loss
            interval_steps += 1
            if bar is not None:
                bar.update(1)

            if iter_num % cfg.log_interval == 0 or iter_num >= cfg.max_iters:
                train_loss = all_mean(interval_loss / interval_steps).item()
                dt = time.time() - t0
                tok_s = tokens_per_iter * interval_steps / dt
                mfu = flops_per_iter_rank * interval_steps / dt / peak if peak else None
                mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
                say(f"iter {iter_num}: train loss {train_loss:.4f}, lr {lr:.3e}, {tok_s:,.0f} tok/s, mfu {mfu_text}")
                if master:
                    log.write(iter=iter_num, tokens=iter_num * tokens_per_iter, train_loss=train_loss,
                              lr=lr, tokens_per_sec=tok_s, mfu=mfu)
                    if wandb_run is not None:
                        wandb_run.log({"train/loss": train_loss, "lr": lr, "tokens_per_sec": tok_s,
                                       "mfu": mfu, "tokens": iter_num * tokens_per_iter}, step=iter_num)
                interval_loss, interval_steps = torch.zeros((), device=device), 0
                t0 = time.time()

            if stop_requested():
                say(f"SIGTERM received: saving a checkpoint at iter {iter_num} and exiting")
                save(iter_num)
                break
    finally:
        if bar is not None:
            bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if wandb_run is not None:
            wandb_run.finish()
        if ddp:
            # Free DDP's reducer while the process group is still registered: if the reducer
            # held the last reference, the group's destructor would run under the GIL and wait
            # for a gloo worker that needs the GIL to release the last collective's tensors.
            del model
            gc.collect()
            dist.destroy_process_group()
        torch.use_deterministic_algorithms(was_deterministic)
    return {"iter_num": iter_num, "val_loss": val_loss, "best_val_loss": best_val_loss,
            "out_dir": cfg.out_dir, "model": raw_model}


def tqdm_range(n: int, enabled: bool, desc: str):
    if not enabled:
        return range(n)
    from tqdm import tqdm
    return tqdm(range(n), desc=desc, leave=False, dynamic_ncols=True)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except ShardError as e:                 # missing or corrupt data: the message says which file
        sys.exit(f"data error: {e}")
