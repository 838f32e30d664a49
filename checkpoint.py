"""Training checkpoints that a crash can never destroy.

``out_dir/ckpt.pt`` holds everything needed to continue exactly: model and optimizer state,
iteration, training config, model config, and each rank's RNG and data-stream state. It is
written to a temporary file, fsync'ed, then renamed over the old one (``os.replace`` is
atomic on POSIX), so at every instant ``ckpt.pt`` is either the previous good checkpoint or
the new complete one. Next to it, ``config.json`` + ``model.safetensors`` (``save_pretrained``)
let ``GPT.from_pretrained(out_dir)`` load the weights for evaluation.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

CKPT_NAME = "ckpt.pt"
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def clean_state_dict(state: dict) -> dict:
    """Drop the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                                   # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)               # mkstemp makes 0600 files; use the usual umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def save_pretrained_atomic(model, out_dir: str) -> None:
    """``model.save_pretrained`` into a temporary folder, then move each file into ``out_dir``.

    Each file is replaced atomically; ckpt.pt stays the source of truth for resuming."""
    from transformers.utils import logging as hf_logging
    tmp = tempfile.mkdtemp(prefix=".pretrained.", dir=out_dir)
    try:
        bar_was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()          # no "Writing model shards" bar at every save
        try:
            model.save_pretrained(tmp)
        finally:
            if bar_was_enabled:
                hf_logging.enable_progress_bar()
        for name in sorted(os.listdir(tmp)):
            src = os.path.join(tmp, name)
            with open(src, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(src, _FILE_MODE)
            os.replace(src, os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(out_dir)


def save_checkpoint(out_dir: str, state: dict, model=None) -> str:
    """Write ``state`` to ``out_dir/ckpt.pt`` atomically, then the save_pretrained files."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CKPT_NAME)
    atomic_torch_save(state, path)
    if model is not None:
        save_pretrained_atomic(model, out_dir)
    return path


def checkpoint_path(path: str) -> str:
    """``path`` itself if it is a file, else ``path/ckpt.pt``."""
    return path if os.path.isfile(path) else os.path.join(path, CKPT_NAME)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (folder or file), with a clear error."""
    path = checkpoint_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train with init_from='scratch' first "
                                "or point resume_dir/out_dir at a folder containing ckpt.pt")
    # mmap: the ranks of a node share the file's pages instead of each holding a full copy
    state = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
    for key in ("model", "model_config", "optimizer", "iter_num"):
        if key not in state:
            raise ValueError(f"{path} is not a training checkpoint of this repository (no {key!r})")
    return state
