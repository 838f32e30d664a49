"""Pretrain a LLaMA-style GPT with AdamW; the positional encoding is a config choice.

Single process (CPU or one GPU):
    python train_adam_finewebedu.py config/cpu/train_cpu_grape_ap.py
DDP on all GPUs of a node:
    torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py \
        config/paper/train_llama_mha_rope_medium_adam_80g8.py --seed=42 --data_seed=42 --eval_seed=42
Resume exactly where a run stopped (crash, SIGKILL, SIGTERM pre-emption):
    python train_adam_finewebedu.py config/... --init_from=resume
Size a run before it starts (nothing is allocated or written):
    python train_adam_finewebedu.py config/... --dry_run=True --gpu=8xh100

The settings and their defaults (the paper's medium RoPE run) are in ``training/settings.py``;
a config file overrides them and ``--key=value`` overrides the file (an unknown key or a wrongly
typed value stops the run). The loop itself is ``training/trainer.py``: evaluate, train a step,
log, save; one run at a time per out_dir (``training/run_dir.py``); a non-finite loss stops the
run or rolls it back (``training/divergence.py``). Expected failures end with one line:
``config error:``, ``data error:``, ``checkpoint error:``, ``out_dir error:``. SIGTERM and Ctrl-C
save a checkpoint and exit 0; a second Ctrl-C stops at once (``interrupted:``, status 130).
"""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack

from training.backend_check import BackendMismatch
from training.checkpoint import CheckpointError
from training.configurator import ConfigError, configure
from training.divergence import TrainingDiverged
from training.run_dir import OutDirError
from training.settings import defaults, derive_defaults, validate
from training.shards import ShardError
from training.sizing import dry_run
from training.stop_signals import Interrupted
from training.trainer import Trainer, start_runtime


def main(argv=None) -> dict:
    """Train; returns iter_num, val_loss, best_val_loss, out_dir and the model."""
    argv = sys.argv[1:] if argv is None else list(argv)
    values, accepted = defaults()
    cfg, explicit = configure(argv, values, accepted)
    derive_defaults(cfg, explicit)
    validate(cfg, explicit)
    if cfg.dry_run:                     # size the run and stop: no device, data or out_dir is touched
        text, estimate, _ = dry_run(cfg)
        print(text)
        return {"dry_run": estimate}
    with ExitStack() as on_exit:        # releases the out_dir lock and leaves DDP however the run ends
        runtime = start_runtime(cfg, explicit)
        on_exit.callback(runtime.close)
        return Trainer(cfg, explicit, runtime, on_exit).run()


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
    except (Interrupted, KeyboardInterrupt) as e:        # a second Ctrl-C (or one before training began)
        print(f"interrupted: {e or 'stopped by Ctrl-C before training began; nothing was saved'}", file=sys.stderr)
        sys.exit(130)
    except tuple(EXIT_MESSAGES) as e:
        if isinstance(e, SAME_ON_EVERY_RANK) and int(os.environ.get("RANK", 0)) != 0:
            sys.exit(0)
        prefix = next(p for kind, p in EXIT_MESSAGES.items() if isinstance(e, kind))
        sys.exit(f"{prefix}{e}")


if __name__ == "__main__":
    cli()
