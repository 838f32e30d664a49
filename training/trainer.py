"""The training loop as a small object with named steps.

``Runtime`` is where the run executes (processes, device, precision); ``Trainer`` holds the
run's state (model, optimizer, data streams, iteration, best validation loss, what rollbacks
changed) and its steps:

    while True:
        if evaluation is due: evaluate()           # validation loss, log, save when due
        if finished: break
        train_step()                               # one optimizer step over the micro-batches
        if logging is due: log_progress()
        if SIGTERM: save(); break

Non-finite values are checked where the loop synchronises anyway (``check_finite``): the run
stops with ``TrainingDiverged``, or ``roll_back`` restores the last checkpoint and raises
``RolledBack``, which sends the loop back to its top. Under DDP every rank runs the same steps
at the same points; logging and checkpoint files belong to rank 0.
"""
from __future__ import annotations

import gc
import os
import random
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT
from training.backend_check import check_backends
from training.checkpoint import (CKPT_NAME, CheckpointError, DiskFull, clean_state_dict, free_bytes, load_checkpoint,
                                 numpy_rng_state, save_checkpoint)
from training.configurator import ConfigError, model_fields
from training.dataloader import TokenBatches
from training.divergence import (Divergence, NonFiniteWatch, Recovery, TrainingDiverged, check_validation_loss,
                                 nonfinite_parameters)
from training.out_dir_checks import LOG_NAME, OutDirError, checkpoint_bytes, human
from training.progress import on_terminal, progress_bar
from training.run_dir import checkpoint_to_resume, claim_on_rank0
from training.runlog import JsonlLog
from training.settings import get_lr, model_config_from
from training.sizing import gpu_peak_flops
from training.stop_signals import Interrupted, StopRequests


# ----------------------------------------------------------------------------------------
# Where the run executes
# ----------------------------------------------------------------------------------------

@dataclass
class Runtime:
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: torch.device
    dtype: str                  # the autocast dtype on CUDA; float32 elsewhere
    was_deterministic: bool     # restored by close()

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ptdtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    def autocast(self):
        if self.device.type == "cuda" and self.dtype != "float32":
            return torch.autocast(device_type=self.device.type, dtype=self.ptdtype)
        return nullcontext()

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.ddp:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / self.world
        return value

    def to_device(self, x: torch.Tensor, y: torch.Tensor):
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def close(self) -> None:
        """Leave the process group and restore the determinism switch (once; safe to repeat)."""
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()
        torch.use_deterministic_algorithms(self.was_deterministic)


def check_device(device: str, ddp: bool = False) -> None:
    """ConfigError for a device this machine does not have (a CUDA index beyond its GPUs, CUDA
    without a GPU, a name torch does not know), before anything is allocated or written. Under
    torchrun each rank uses the GPU of its local rank, so only the kind matters."""
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"config key 'device': {device!r} is not a device torch knows; use 'auto', 'cpu', "
                          "'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"config key 'device' is {str(device)!r}, but this machine has no CUDA GPU that "
                              "torch can use; use --device=cpu (or auto)")
        if device.index is not None and device.index >= count and not ddp:
            raise ConfigError(f"config key 'device' is {str(device)!r}, but this machine has {count} CUDA GPU(s)")
    elif device.type not in ("cpu", "cuda"):
        raise ConfigError(f"config key 'device' is {str(device)!r}: only 'cpu' and 'cuda' are supported")


def start_runtime(cfg, explicit: set[str]) -> Runtime:
    """Join the process group under torchrun, pick the device, set the determinism switches."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if cfg.device != "auto":
        check_device(cfg.device, ddp)              # before joining the process group: every rank alike
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
        device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))

    if cfg.bitwise_deterministic:
        cfg.deterministic, cfg.compile = True, False
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before the first cuBLAS call
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = not cfg.bitwise_deterministic
    torch.backends.cudnn.allow_tf32 = not cfg.bitwise_deterministic
    if cfg.bitwise_deterministic and device.type == "cuda":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_math_sdp(True)

    dtype = cfg.dtype if device.type == "cuda" else "float32"
    if device.type != "cuda" and "dtype" in explicit and cfg.dtype != "float32" and rank == 0:
        print(f"note: dtype={cfg.dtype!r} applies to GPUs; training on {device} in float32")
    return Runtime(ddp, rank, local_rank, world, device, dtype, was_deterministic)


# ----------------------------------------------------------------------------------------
# What a checkpoint holds besides the weights: each rank's random state
# ----------------------------------------------------------------------------------------

def rank_state(train_batches: TokenBatches) -> dict:
    """Everything random that belongs to one rank, for exact resumption."""
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy_rng": numpy_rng_state(),            # plain values: checkpoints load without unpickling code
        "python_rng": random.getstate(),
        "data": train_batches.state_dict(),
    }


def restore_rank_state(state: dict, train_batches: TokenBatches) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    train_batches.load_state_dict(state["data"])


def model_for(cfg, explicit: set[str], ckpt: Optional[dict], resume_from: str) -> GPT:
    """The model to train: the config's, or the checkpoint's when resuming (a model setting
    given explicitly that differs from the checkpoint's is an error; the kernel may change)."""
    if ckpt is None:
        model_config = model_config_from({k: cfg[k] for k in model_fields()})
    else:
        kernel = {"attn_backend": cfg.attn_backend} if "attn_backend" in explicit else {}
        try:
            model_config = model_config_from({**ckpt["model_config"], **kernel})
        except Exception as e:                    # values the model refuses, or of the wrong type, in the file
            raise CheckpointError(f"{resume_from}: its model_config does not describe a model this repository can "
                                  f"build ({str(e).strip().splitlines()[-1].strip()[:300]})") from None
        differing = [f"{k}={cfg[k]!r} (checkpoint: {getattr(model_config, k)!r})" for k in model_fields()
                     if k in explicit and k != "attn_backend" and getattr(model_config, k) != cfg[k]]
        if differing:
            # a different model would silently replace the one asked for; the checkpoint is untouched
            raise ConfigError(f"cannot resume from {resume_from}: its model was trained with other settings: "
                              f"{', '.join(differing)}. Resume with the config it was trained with, or start "
                              f"a new run in another out_dir")
        for k in model_fields():
            cfg[k] = getattr(model_config, k)
    torch.manual_seed(cfg.seed)
    try:
        return GPT(model_config)
    except ValueError as e:                       # an encoding refusing these settings
        raise ConfigError(str(e)) from None


def weight_decay_groups_of(cfg, explicit: set[str], ckpt: Optional[dict], resume_from: str) -> str:
    """The optimizer groups must be those the checkpoint's optimizer state was saved with;
    checkpoints from before the key existed used 'matrices'."""
    if ckpt is None:
        return cfg.weight_decay_on
    saved = ckpt.get("config", {}).get("weight_decay_on", "matrices")
    if "weight_decay_on" in explicit and cfg.weight_decay_on != saved:
        raise ConfigError(f"cannot resume from {resume_from} with weight_decay_on={cfg.weight_decay_on!r}: "
                          f"it was trained with {saved!r}")
    return saved


def check_resumable(cfg, ckpt: dict, world: int, path: str) -> None:
    """ConfigError, before anything is written, for settings the checkpoint's data state cannot
    continue with: another data_rng_mode or data seed, or (stateful data) another number of ranks."""
    saved = ckpt.get("config", {})
    for key in ("data_rng_mode", "data_seed"):
        if key in saved and saved[key] != cfg[key]:
            follows = " (data_seed follows seed unless set)" if key == "data_seed" else ""
            raise ConfigError(f"cannot resume from {path} with {key}={cfg[key]!r}: it was trained with "
                              f"{key}={saved[key]!r}{follows}; resume with the same value, or start a new run in "
                              "another out_dir")
    ranks = len(ckpt.get("rank_states") or [])
    if cfg.data_rng_mode == "stateful" and ranks != world:
        raise ConfigError(f"cannot resume from {path} on {world} rank(s): it was written by {ranks}, and "
                          "data_rng_mode='stateful' continues each rank's own data stream; resume with "
                          f"WORLD_SIZE={ranks} (data_rng_mode='stateless' runs resume on any number of ranks)")


class RolledBack(Exception):
    """The run went back to its last checkpoint; the loop starts over from there."""


# ----------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg, explicit: set[str], runtime: Runtime, on_exit: ExitStack):
        self.cfg, self.rt = cfg, runtime
        rt = runtime
        # SIGTERM and Ctrl-C from now on: checkpoint after the step they arrive in, then exit
        self.stops = StopRequests(announce=rt.master).install()
        on_exit.callback(self.stops.restore)
        # -- model, optimizer, state (nothing is written to out_dir before the claim) ------
        self.resume_from = cfg.resume_dir or cfg.out_dir
        resuming = cfg.init_from == "resume"
        ckpt = None
        if resuming:
            self.resume_path = checkpoint_to_resume(self.resume_from)
            ckpt = load_checkpoint(self.resume_path, map_location="cpu", trust_pickle=cfg.trust_checkpoint_pickle)
            check_resumable(cfg, ckpt, rt.world, self.resume_path)
        where = self.resume_path if resuming else self.resume_from
        self.raw_model = model_for(cfg, explicit, ckpt, where).to(rt.device)
        self.raw_model.set_activation_checkpointing(cfg.activation_checkpointing)
        cfg.weight_decay_on = weight_decay_groups_of(cfg, explicit, ckpt, where)
        groups = self.raw_model.optimizer_groups(cfg.weight_decay, cfg.weight_decay_on)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                           fused=rt.device.type in ("cuda", "cpu"))   # much faster than foreach
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == "float16")
        self.iter_num, self.best_val_loss, self.wandb_id, self.val_loss = 0, float("inf"), None, None

        # -- out_dir: one run at a time -------------------------------------------------------
        resumes_out_dir = resuming and os.path.realpath(os.path.dirname(self.resume_path)) \
            == os.path.realpath(cfg.out_dir)
        self.fresh = not cfg.eval_only and not resumes_out_dir       # would replace what out_dir holds
        self.checkpoint_bytes = checkpoint_bytes(self.raw_model)
        lock = claim_on_rank0(cfg.out_dir, self.fresh, cfg.overwrite_out_dir, rt.master, rt.ddp,
                              0 if cfg.eval_only else self.checkpoint_bytes)     # eval_only saves nothing
        if lock is not None:
            on_exit.callback(lock.release)
        if cfg.check_backends and rt.device.type == "cuda":       # before the first step (backend_check.py)
            check_backends(self.raw_model, rt.ptdtype, log=print if rt.master else lambda *_: None)
        self.model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        self.eval_model = self.model
        if rt.ddp:
            self.model = DDP(self.model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

        # -- data ------------------------------------------------------------------------------
        self.data_dir = cfg.data_dir or os.path.join(cfg.data_path, cfg.dataset)
        B, T, accum = cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps
        # stateless: rank r's micro-step m reads the step's global micro-batch r * accum + m, so the
        # global batch of a step is the same however it is split over ranks (and a run on 2 ranks
        # equals one on 1 rank with twice the accumulation). stateful: one RNG stream per rank.
        self.stateless = cfg.data_rng_mode == "stateless"
        vocab = self.raw_model.config.vocab_size
        self.train_batches = TokenBatches(self.data_dir, "train", B, T, rank=0 if self.stateless else rt.rank,
                                          world_size=1 if self.stateless else rt.world, seed=cfg.data_seed,
                                          mode=cfg.data_rng_mode, vocab_size=vocab)
        self.val_batches = TokenBatches(self.data_dir, "val", B, T, seed=cfg.eval_seed, mode="stateless",
                                        vocab_size=vocab)
        self.first_micro = rt.rank * accum if self.stateless else 0
        self.tokens_per_iter = B * T * accum * rt.world
        self.flops_per_iter_rank = self.raw_model.flops_per_token() * B * T * accum
        self.peak_flops = cfg.gpu_peak_flops or gpu_peak_flops(rt.device)

        # -- divergence: what rollbacks changed, and the checkpoint they return to -------------
        self.recovery = Recovery()
        self.last_good, self.last_good_iter = None, None
        if ckpt is not None:
            self.restore(ckpt, self.resume_path)
            self.wandb_id = ckpt.get("wandb_id")
            self.recovery = Recovery.from_state(ckpt.get("recovery"))
            self.last_good, self.last_good_iter = self.resume_path, self.iter_num
            del ckpt                                 # a CPU copy of model + optimizer: free it
        self.watch = NonFiniteWatch(rt.device)

        # -- logging ---------------------------------------------------------------------------
        self.show = rt.master and cfg.progress          # bars on a terminal only (training/progress.py)
        self.bar, self.log, self.wandb_run = None, None, None
        if rt.master:
            self.open_logs()
        self.first_val = self.last_val = None  # (iter, loss) of this run's first and latest evaluation
        self.preempted = False

    # -- set-up helpers ------------------------------------------------------------------------
    def open_logs(self) -> None:
        cfg, c = self.cfg, self.raw_model.config
        path = os.path.join(cfg.out_dir, LOG_NAME)
        try:                                         # a new run starts a new log; a resume appends
            self.log = JsonlLog.create(path) if self.fresh else JsonlLog.append_to(path)
        except OSError as e:
            link = f" (a symbolic link to {os.readlink(path)}; a run never makes one)" if os.path.islink(path) else ""
            raise OutDirError(f"cannot write {path}{link}: {e.strerror}") from None
        print(f"model: {c.pos_encoding}, {c.n_layer} layers, n_embd {c.n_embd}, "
              f"{self.raw_model.num_parameters_unique() / 1e6:.2f}M parameters; {self.rt.world} rank(s) on "
              f"{self.rt.device}, {self.rt.dtype}; {self.tokens_per_iter:,} tokens per iteration; data {self.data_dir}")
        if cfg.wandb_log:
            import wandb
            name = cfg.wandb_run_name or f"{c.pos_encoding}-{os.path.basename(cfg.out_dir.rstrip('/'))}"
            self.wandb_run = wandb.init(project=cfg.wandb_project, config=dict(cfg), dir=cfg.out_dir, name=name,
                                        mode=cfg.wandb_mode or None, id=self.wandb_id, resume="allow")
            self.wandb_id = self.wandb_run.id

    def restore(self, ckpt: dict, path: str) -> None:
        """Weights, optimizer, scaler, iteration, best loss and this rank's RNG and data state
        (check_resumable has refused settings the data state cannot follow)."""
        try:
            self.raw_model.load_state_dict(clean_state_dict(ckpt["model"]))
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:     # torch's messages span lines: the first says it
            detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).strip())
            raise CheckpointError(f"{path} does not fit the model its own config describes: {detail[:300]}") from None
        states = ckpt.get("rank_states") or []
        if len(states) == self.rt.world:
            restore_rank_state(states[self.rt.rank], self.train_batches)
        self.iter_num, self.best_val_loss = ckpt["iter_num"], ckpt.get("best_val_loss", float("inf"))

    def say(self, msg: str) -> None:
        if self.rt.master:
            (self.bar.write if self.bar is not None else print)(msg)

    def record(self, wandb_values: dict, **record) -> None:
        """One log.jsonl record, and the same values to wandb when it is on (rank 0)."""
        if not self.rt.master:
            return
        self.write_log(**record)
        if self.wandb_run is not None:
            self.wandb_run.log(wandb_values, step=self.iter_num)

    def write_log(self, **record) -> None:
        """One log.jsonl record (rank 0); a disk that cannot take it stops the run in one line."""
        try:
            self.log.write(**record)
        except OSError as e:
            raise OutDirError(f"cannot write {self.log.path} at iter {self.iter_num}: {e.strerror}; "
                              f"{self.kept()}") from None

    # -- the steps -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """The validation loss on the same batches at every evaluation; logged, then a checkpoint
        when the loss improved or every time (``always_save_checkpoint``)."""
        self.check_finite(self.watch.poll())
        self.eval_model.eval()
        total = torch.zeros((), device=self.rt.device, dtype=torch.float64)
        for k in progress_bar(range(self.cfg.eval_iters), enabled=self.show and self.cfg.eval_iters >= 20,
                              desc="val", leave=False):
            x, y = self.rt.to_device(*self.val_batches.get(k, self.rt.rank))
            with self.rt.autocast():
                _, loss = self.eval_model(x, y)
            total += loss.double()
        self.eval_model.train()
        val_loss = self.rt.all_mean(total / self.cfg.eval_iters).item()
        self.check_finite(check_validation_loss(self.iter_num, val_loss))
        self.val_loss, self.last_val = val_loss, (self.iter_num, val_loss)
        self.first_val = self.first_val or self.last_val
        self.say(f"iter {self.iter_num}: val loss {val_loss:.4f}")
        tokens = self.iter_num * self.tokens_per_iter
        self.record({"val/loss": val_loss, "tokens": tokens}, iter=self.iter_num, tokens=tokens, val_loss=val_loss)
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        if self.iter_num > self.start_iter and (improved or self.cfg.always_save_checkpoint):
            self.save(best=improved)
        self.t0 = time.time()                          # tokens/s measures training only
        return val_loss

    def train_step(self) -> None:
        """One optimizer step: the micro-batches (gradients all-reduced on the last), clipping,
        AdamW; the loss and gradient norm are watched without synchronising."""
        cfg = self.cfg
        self.lr = get_lr(self.iter_num, cfg) * self.recovery.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        step_loss = torch.zeros((), device=self.rt.device)
        data_step = self.iter_num + self.recovery.skipped_steps
        accum = cfg.gradient_accumulation_steps
        for micro in range(accum):
            x, y = self.rt.to_device(*self.train_batches.get(data_step, self.first_micro + micro))
            sync = nullcontext() if (not self.rt.ddp or micro == accum - 1) else self.model.no_sync()
            with sync:
                with self.rt.autocast():
                    loss = self.model(x, y)[1]         # drop the float32 logits now, not after the backward
                loss = loss / accum
                self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        grad_norm = None
        params = self.raw_model.parameters()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        elif not self.scaler.is_enabled():
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # float16: an infinite gradient is routine, GradScaler skips that step
        self.watch.observe(self.iter_num + 1, step_loss, None if self.scaler.is_enabled() else grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        self.interval_loss += step_loss
        self.interval_steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def log_progress(self) -> float:
        """Training loss, learning rate, tokens/s and MFU over the steps since the last log."""
        self.check_finite(self.watch.poll())
        train_loss = self.rt.all_mean(self.interval_loss / self.interval_steps).item()
        dt = time.time() - self.t0
        tok_s = self.tokens_per_iter * self.interval_steps / dt
        mfu = self.flops_per_iter_rank * self.interval_steps / dt / self.peak_flops if self.peak_flops else None
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        self.say(f"iter {self.iter_num}: train loss {train_loss:.4f}, lr {self.lr:.3e}, {tok_s:,.0f} tok/s, "
                 f"mfu {mfu_text}")
        tokens = self.iter_num * self.tokens_per_iter
        self.record({"train/loss": train_loss, "lr": self.lr, "tokens_per_sec": tok_s, "mfu": mfu, "tokens": tokens},
                    iter=self.iter_num, tokens=tokens, train_loss=train_loss, lr=self.lr, tokens_per_sec=tok_s, mfu=mfu)
        self.reset_interval()
        return train_loss

    def save(self, best: bool = False) -> str:
        """ckpt.pt (and best.pt when ``best``) with everything a resume needs; never weights that
        are not finite. Every rank takes part (its random state); rank 0 writes."""
        bad = nonfinite_parameters(self.raw_model)      # the same on every rank: DDP keeps them equal
        if bad:
            raise TrainingDiverged(f"training diverged by iter {self.iter_num}: the weights {', '.join(bad[:4])} "
                                   f"are not finite; nothing was saved ({self.stop_advice()})")
        path = os.path.join(self.cfg.out_dir, CKPT_NAME)
        states = [rank_state(self.train_batches)]
        if self.rt.ddp:
            states = [None] * self.rt.world
            dist.all_gather_object(states, rank_state(self.train_batches))
        if not self.rt.master:
            self.last_good, self.last_good_iter = path, self.iter_num    # rank 0 stops the job if it fails
            return path
        state = {
            "model": clean_state_dict(self.raw_model.state_dict()),
            "model_config": self.raw_model.config.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iter_num": self.iter_num,
            "best_val_loss": self.best_val_loss,
            "val_loss": self.val_loss,
            "tokens": self.iter_num * self.tokens_per_iter,
            "config": dict(self.cfg),
            "world_size": self.rt.world,
            "rank_states": states,
            "wandb_id": self.wandb_id,
            "recovery": self.recovery.state_dict(),
        }
        try:
            save_checkpoint(self.cfg.out_dir, state, self.raw_model, best=best)
        except DiskFull as e:
            raise CheckpointError(self.disk_full_message(e.what)) from None
        self.last_good, self.last_good_iter = path, self.iter_num
        self.say(f"saved checkpoint at iter {self.iter_num} to {self.cfg.out_dir}" + (" (best so far)" if best else ""))
        return path

    def disk_full_message(self, what: str) -> str:
        out_dir = self.cfg.out_dir
        return (f"disk full while saving the checkpoint of iter {self.iter_num} to {out_dir} (writing {what}; "
                f"{human(free_bytes(out_dir))} free, a checkpoint needs about {human(self.checkpoint_bytes)}); "
                f"{self.kept()}. Free some space, then "
                + ("resume with --init_from=resume" if self.last_good else "start the run again"))

    def kept(self, state: str = "intact") -> str:
        """What the last checkpoint is, for messages about stopping."""
        if self.last_good:
            return f"the last checkpoint, {self.last_good} (iter {self.last_good_iter}), is {state}"
        return "no checkpoint had been written yet"

    def check_finite(self, event: Optional[Divergence]) -> None:
        """Nothing to do for no event; else stop (TrainingDiverged) or roll back (RolledBack).
        Every rank calls this at the same points with the same event."""
        if event is None:
            return
        self.say(str(event))
        if self.rt.master:
            self.write_log(iter=event.iter, diverged=event.what)
        if self.cfg.on_divergence != "rollback":
            raise TrainingDiverged(f"{event}. Nothing non-finite was saved; {self.stop_advice()}")
        if self.last_good is None or self.recovery.rollbacks >= self.cfg.max_rollbacks:
            why = ("no checkpoint to roll back to" if self.last_good is None
                   else f"{self.recovery.rollbacks} rollback(s) already (max_rollbacks={self.cfg.max_rollbacks})")
            raise TrainingDiverged(f"{event}; {why}. Nothing non-finite was saved; {self.stop_advice()}")
        self.roll_back(event)
        raise RolledBack

    def roll_back(self, event: Divergence) -> None:
        """Back to the last checkpoint; skip the batches of the iterations since; lower the lr."""
        self.restore(load_checkpoint(self.last_good, map_location="cpu", trust_pickle=self.cfg.trust_checkpoint_pickle),
                     self.last_good)
        skipped = self.recovery.roll_back(event.iter, self.iter_num, self.cfg.rollback_lr_factor)
        if not self.stateless:
            self.train_batches.skip(skipped * self.cfg.gradient_accumulation_steps)
        self.watch.reset()
        self.start_iter = self.iter_num
        self.reset_interval()
        if self.bar is not None:
            self.bar.n = self.iter_num
            self.bar.refresh()
        self.say(f"rolled back to {self.last_good} (iter {self.iter_num}); skipping the batches of iters "
                 f"{self.iter_num + 1}..{event.iter}; learning rate x{self.recovery.lr_scale:g} from now on "
                 f"(rollback {self.recovery.rollbacks} of at most {self.cfg.max_rollbacks})")
        if self.rt.master:
            self.write_log(iter=self.iter_num, rollback_from=event.iter, skipped_iters=skipped,
                           lr_scale=self.recovery.lr_scale)

    def stop_advice(self) -> str:
        kept = (f"the last checkpoint, {self.last_good} (iter {self.last_good_iter}), is untouched" if self.last_good
                else "no checkpoint had been written")
        return (f"{kept}. Lower learning_rate (or raise warmup_iters), or pass --on_divergence=rollback to "
                "go back to the last checkpoint, skip the batches since, and lower the learning rate")

    # -- the loop ------------------------------------------------------------------------------
    def reset_interval(self) -> None:
        self.interval_loss, self.interval_steps = torch.zeros((), device=self.rt.device), 0
        self.t0 = time.time()

    def evaluation_due(self) -> bool:
        return self.iter_num % self.cfg.eval_interval == 0 or self.finished()

    def finished(self) -> bool:
        return self.cfg.eval_only or self.iter_num >= self.cfg.max_iters

    def log_due(self) -> bool:
        return self.iter_num % self.cfg.log_interval == 0 or self.iter_num >= self.cfg.max_iters

    def stop_requested(self) -> bool:
        """SIGTERM (cluster pre-emption) or Ctrl-C on any rank: every rank stops at this step."""
        asked = self.stops.requested is not None
        if not self.rt.ddp:
            return asked
        return bool(self.rt.all_mean(torch.tensor(float(asked), device=self.rt.device)).item() > 0)

    def run(self) -> dict:
        """Train to max_iters (or evaluate once with eval_only); returns the run's summary."""
        self.start_iter = self.iter_num
        if self.show and on_terminal():
            self.bar = progress_bar(total=self.cfg.max_iters, initial=self.iter_num, unit="it")
        self.reset_interval()
        started = time.time()
        try:
            if self.stop_requested():           # asked while the run was being set up: nothing new to save
                self.say(f"{self.stops.requested or 'a stop request'} received before the first step: nothing new "
                         "to save; exiting")
                self.preempted = True
            while not self.preempted:
                try:
                    if self.evaluation_due():
                        self.evaluate()
                    if self.finished():
                        break
                    self.train_step()
                    if self.log_due():
                        self.log_progress()
                    if self.stop_requested():
                        self.check_finite(self.watch.poll())
                        self.say(f"{self.stops.requested or 'stop'} received: saving a checkpoint at iter "
                                 f"{self.iter_num} and exiting")
                        self.save()
                        self.preempted = True
                        break
                except RolledBack:
                    continue
            self.say(self.summary(time.time() - started))
        except KeyboardInterrupt:                # a second Ctrl-C: at once, nothing saved
            raise Interrupted(f"stopped by a second Ctrl-C at iter {self.iter_num} without saving; "
                              f"{self.kept('untouched')}") from None
        finally:
            self.close()
            self.rt.close()
        return {"iter_num": self.iter_num, "val_loss": self.val_loss, "best_val_loss": self.best_val_loss,
                "out_dir": self.cfg.out_dir, "model": self.raw_model}

    def summary(self, seconds: float) -> str:
        """What the run did, in one line, for whoever started it."""
        cfg = self.cfg
        trained = self.iter_num - self.start_iter
        how = f"stopped by {self.stops.requested}" if self.preempted else "done"
        text = f"{how}: {trained} iterations ({trained * self.tokens_per_iter:,} tokens) in {seconds:.0f} s"
        if self.first_val is not None and self.last_val != self.first_val:
            text += (f"; validation loss {self.first_val[1]:.3f} at iter {self.first_val[0]} -> {self.last_val[1]:.3f} "
                     f"at iter {self.last_val[0]} (best {self.best_val_loss:.3f})")
        elif self.first_val is not None:
            text += f"; validation loss {self.first_val[1]:.3f} at iter {self.first_val[0]}"
        if self.last_good is not None and not cfg.eval_only:
            text += f"; checkpoint and Hugging Face folder in {cfg.out_dir}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.stops.restore()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.rt.ddp:
            # Free DDP's reducer while the process group is still registered: if the reducer
            # held the last reference, the group's destructor would run under the GIL and wait
            # for a gloo worker that needs the GIL to release the last collective's tensors.
            del self.model
            gc.collect()

