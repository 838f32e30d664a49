"""Pretrain a LLaMA-style GPT with AdamW; the positional encoding is a config choice.

Single process (CPU or one GPU):
    python train_adam_finewebedu.py config/cpu/train_cpu_grape_ap.py
DDP on all GPUs of a node:
    torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py \
        config/paper/train_llama_mha_rope_medium_adam_80g8.py --seed=42 --data_seed=42 --eval_seed=42
Resume exactly where a run stopped (crash, SIGKILL, SIGTERM pre-emption):
    python train_adam_finewebedu.py config/... --init_from=resume

One run at a time per out_dir (run_dir.py: a lock; starting over in a used out_dir needs
--overwrite_out_dir=True). A non-finite loss or gradient stops the run before anything
non-finite is saved, or rolls back with --on_divergence=rollback (divergence.py).

Defaults below (the paper's medium RoPE run), overridden by config files and then by
``--key=value`` (configurator.py; an unknown key or a wrongly typed value stops the run).
``gradient_accumulation_steps`` and ``batch_size`` are per rank: the global batch is
batch_size * gradient_accumulation_steps * WORLD_SIZE sequences of block_size tokens.
"""
from __future__ import annotations

import gc
import os
import random
import signal
import sys
import threading
import time
from contextlib import ExitStack, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT
from training.backend_check import BackendMismatch, check_backends
from training.checkpoint import CKPT_NAME, CheckpointError, checkpoint_path, clean_state_dict, load_checkpoint, save_checkpoint
from training.configurator import ConfigError, configure, model_fields
from training.divergence import NonFiniteWatch, Recovery, TrainingDiverged, check_validation_loss, nonfinite_parameters
from training.run_dir import OutDirError, claim_on_rank0
from training.runlog import JsonlLog
from training.settings import defaults, derive_defaults, get_lr, model_config_from, validate
from training.shards import ShardError
from training.sizing import gpu_peak_flops

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


def restore_training_state(ckpt: dict, raw_model: GPT, optimizer, scaler, train_batches, rank: int,
                           world: int) -> tuple[int, float]:
    """Weights, optimizer, scaler and this rank's RNG and data state from a checkpoint;
    returns its iteration and best validation loss. Used to resume and to roll back."""
    raw_model.load_state_dict(clean_state_dict(ckpt["model"]))
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    states = ckpt.get("rank_states") or []
    if len(states) == world:
        restore_rank_state(states[rank], train_batches)
    elif train_batches.mode == "stateful":
        raise ValueError(f"checkpoint was written by {len(states)} rank(s), this run has {world}; "
                         "data_rng_mode='stateful' resumes only with the same WORLD_SIZE")
    return ckpt["iter_num"], ckpt.get("best_val_loss", float("inf"))


def main(argv=None) -> dict:
    """Train; returns iter_num, val_loss, best_val_loss, out_dir and the model."""
    with ExitStack() as on_exit:          # releases the out_dir lock however the run ends
        return train(argv, on_exit)


def train(argv, on_exit: ExitStack) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    values, accepted = defaults()
    cfg, explicit = configure(argv, values, accepted)
    derive_defaults(cfg, explicit)
    validate(cfg, explicit)
    if cfg.dry_run:                     # size the run and stop: no device, data or out_dir is touched
        from training.sizing import dry_run
        text, estimate, _ = dry_run(cfg)
        print(text)
        return {"dry_run": estimate}
    from training.dataloader import TokenBatches   # imported late: the data module is optional for --help-like uses

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
        kernel = {"attn_backend": cfg.attn_backend} if "attn_backend" in explicit else {}
        model_config = model_config_from({**ckpt["model_config"], **kernel})   # a kernel choice may change
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
        model_config = model_config_from({k: cfg[k] for k in model_fields()})
    torch.manual_seed(cfg.seed)
    try:
        raw_model = GPT(model_config).to(device)
    except ValueError as e:                       # an encoding refusing these settings
        raise ConfigError(str(e)) from None
    if ckpt is not None:
        # the groups must be the ones the checkpoint's optimizer state was saved with; checkpoints
        # from before this key existed used 'matrices'
        saved = ckpt.get("config", {}).get("weight_decay_on", "matrices")
        if "weight_decay_on" in explicit and cfg.weight_decay_on != saved:
            raise ConfigError(f"cannot resume from {resume_from} with weight_decay_on={cfg.weight_decay_on!r}: "
                              f"it was trained with {saved!r}")
        cfg.weight_decay_on = saved
    groups = raw_model.optimizer_groups(cfg.weight_decay, cfg.weight_decay_on)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                  fused=device_type in ("cuda", "cpu"))   # one kernel: much faster than foreach
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    iter_num, best_val_loss, wandb_id = 0, float("inf"), None

    # -- out_dir: one run at a time; config errors above, nothing written there before ------
    resumes_out_dir = resuming and os.path.realpath(os.path.dirname(checkpoint_path(resume_from))) \
        == os.path.realpath(cfg.out_dir)
    fresh = not cfg.eval_only and not resumes_out_dir       # would replace what out_dir holds
    try:
        lock = claim_on_rank0(cfg.out_dir, fresh, cfg.overwrite_out_dir, master, ddp)
    except BaseException:
        if ddp:
            dist.destroy_process_group()     # every rank gets here: rank 0's verdict is broadcast
        raise
    if lock is not None:
        on_exit.callback(lock.release)
    if cfg.check_backends and device_type == "cuda":       # before the first step (backend_check.py)
        check_backends(raw_model, ptdtype, log=print if master else lambda *_: None)
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
                                 mode=cfg.data_rng_mode, vocab_size=model_config.vocab_size)
    val_batches = TokenBatches(data_dir, "val", B, T, seed=cfg.eval_seed, mode="stateless",
                               vocab_size=model_config.vocab_size)
    first_micro = rank * accum if stateless else 0
    recovery = Recovery()                        # what divergence rollbacks changed (divergence.py)
    last_good, last_good_iter = None, None       # the checkpoint a rollback returns to
    if ckpt is not None:
        iter_num, best_val_loss = restore_training_state(ckpt, raw_model, optimizer, scaler, train_batches,
                                                         rank, world)
        wandb_id = ckpt.get("wandb_id")
        recovery = Recovery.from_state(ckpt.get("recovery"))
        last_good, last_good_iter = checkpoint_path(resume_from), iter_num
        del ckpt                                 # a CPU copy of model + optimizer: free it
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

    def save(iter_num: int, best: bool = False) -> None:
        """ckpt.pt (and best.pt when ``best``); never weights that are not finite."""
        nonlocal last_good, last_good_iter
        bad = nonfinite_parameters(raw_model)      # the same on every rank: DDP keeps them equal
        if bad:
            raise TrainingDiverged(f"training diverged by iter {iter_num}: the weights {', '.join(bad[:4])} are "
                                   f"not finite; nothing was saved ({stop_advice()})")
        last_good, last_good_iter = os.path.join(cfg.out_dir, CKPT_NAME), iter_num
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
            "recovery": recovery.state_dict(),
        }
        save_checkpoint(cfg.out_dir, state, raw_model, best=best)
        say(f"saved checkpoint at iter {iter_num} to {cfg.out_dir}" + (" (best so far)" if best else ""))

    # -- divergence: stop, or roll back to the last checkpoint (divergence.py) --------------
    watch = NonFiniteWatch(device)

    def stop_advice() -> str:
        kept = (f"the last checkpoint, {last_good} (iter {last_good_iter}), is untouched" if last_good
                else "no checkpoint had been written")
        return (f"{kept}. Lower learning_rate (or raise warmup_iters), or pass --on_divergence=rollback to "
                "go back to the last checkpoint, skip the batches since, and lower the learning rate")

    def diverged(event) -> bool:
        """False for no event; else raise TrainingDiverged, or roll back and return True (the
        loop then starts over from the checkpoint). Every rank calls this at the same points."""
        nonlocal iter_num, best_val_loss, start_iter, interval_loss, interval_steps, t0
        if event is None:
            return False
        say(str(event))
        if master:
            log.write(iter=event.iter, diverged=event.what)
        if cfg.on_divergence != "rollback":
            raise TrainingDiverged(f"{event}. Nothing non-finite was saved; {stop_advice()}")
        if last_good is None or recovery.rollbacks >= cfg.max_rollbacks:
            why = ("no checkpoint to roll back to" if last_good is None
                   else f"{recovery.rollbacks} rollback(s) already (max_rollbacks={cfg.max_rollbacks})")
            raise TrainingDiverged(f"{event}; {why}. Nothing non-finite was saved; {stop_advice()}")
        ckpt = load_checkpoint(last_good, map_location="cpu")
        iter_num, best_val_loss = restore_training_state(ckpt, raw_model, optimizer, scaler, train_batches,
                                                         rank, world)
        del ckpt
        skipped = recovery.roll_back(event.iter, iter_num, cfg.rollback_lr_factor)
        if not stateless:
            train_batches.skip(skipped * accum)  # the stream past the skipped iterations' batches
        watch.reset()
        start_iter, interval_loss, interval_steps, t0 = iter_num, torch.zeros((), device=device), 0, time.time()
        if bar is not None:
            bar.n = iter_num
            bar.refresh()
        say(f"rolled back to {last_good} (iter {iter_num}); skipping the batches of iters {iter_num + 1}.."
            f"{event.iter}; learning rate x{recovery.lr_scale:g} from now on (rollback {recovery.rollbacks} "
            f"of at most {cfg.max_rollbacks})")
        if master:
            log.write(iter=iter_num, rollback_from=event.iter, skipped_iters=skipped, lr_scale=recovery.lr_scale)
        return True

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
        if fresh:
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
    flops_per_iter_rank = raw_model.flops_per_token() * B * T * accum

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
                if diverged(watch.poll()):            # raises, or rolls back to the last checkpoint
                    continue
                val_loss = estimate_val_loss()
                if diverged(check_validation_loss(iter_num, val_loss)):
                    continue
                say(f"iter {iter_num}: val loss {val_loss:.4f}")
                if master:
                    log.write(iter=iter_num, tokens=iter_num * tokens_per_iter, val_loss=val_loss)
                    if wandb_run is not None:
                        wandb_run.log({"val/loss": val_loss, "tokens": iter_num * tokens_per_iter}, step=iter_num)
                improved = val_loss < best_val_loss
                best_val_loss = min(best_val_loss, val_loss)
                if iter_num > start_iter and (improved or cfg.always_save_checkpoint):
                    save(iter_num, best=improved)
                t0 = time.time()                      # tokens/s measures training only
            if cfg.eval_only or iter_num >= cfg.max_iters:
                break

            lr = get_lr(iter_num, cfg) * recovery.lr_scale
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            data_step = iter_num + recovery.skipped_steps
            for micro in range(accum):
                x, y = to_device(*train_batches.get(data_step, first_micro + micro))
                # all-reduce gradients only on the last micro-step
                sync = nullcontext() if (not ddp or micro == accum - 1) else model.no_sync()
                with sync:
                    with autocast:
                        loss = model(x, y)[1]   # drop the float32 logits now, not after the backward
                    loss = loss / accum
                    scaler.scale(loss).backward()
                step_loss += loss.detach()
            grad_norm = None
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            elif not scaler.is_enabled():
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in raw_model.parameters() if p.grad is not None])
            # float16: an infinite gradient is routine, GradScaler skips that step
            watch.observe(iter_num + 1, step_loss, None if scaler.is_enabled() else grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            interval_loss += step_loss
            interval_steps += 1
            if bar is not None:
                bar.update(1)

            if iter_num % cfg.log_interval == 0 or iter_num >= cfg.max_iters:
                if diverged(watch.poll()):
                    continue
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
                if diverged(watch.poll()):
                    continue
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


# expected failures -> the one-line message they exit with (no traceback)
EXIT_MESSAGES = {ConfigError: "config error: ", ShardError: "data error: ", CheckpointError: "checkpoint error: ",
                 OutDirError: "out_dir error: ", TrainingDiverged: "",
                 BackendMismatch: "attention backend error: "}      # a fast kernel is wrong on this GPU
# Raised alike on every rank. Rank 0 alone reports them and fails the job; the other ranks leave
# quietly with status 0, since a failed rank makes torchrun kill the others (rank 0 too, maybe
# before it has printed why).
SAME_ON_EVERY_RANK = (ConfigError, OutDirError, TrainingDiverged)


def cli(argv=None) -> None:
    try:
        main(argv)
    except tuple(EXIT_MESSAGES) as e:
        if isinstance(e, SAME_ON_EVERY_RANK) and int(os.environ.get("RANK", 0)) != 0:
            sys.exit(0)
        prefix = next(p for kind, p in EXIT_MESSAGES.items() if isinstance(e, kind))
        sys.exit(f"{prefix}{e}")


if __name__ == "__main__":
    cli()
