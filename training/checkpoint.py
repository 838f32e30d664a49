"""Training checkpoints that a crash can never destroy.

``out_dir/ckpt.pt`` (the latest) holds everything needed to continue exactly: model and
optimizer state, iteration, training config, model config, and each rank's RNG and
data-stream state. It is written to a temporary file, fsync'ed, then renamed over the old
one (``os.replace`` is atomic on POSIX), so at every instant ``ckpt.pt`` is either the
previous good checkpoint or the new complete one. ``out_dir/best.pt`` is the checkpoint with
the lowest validation loss so far: a hard link to the ``ckpt.pt`` it was (no extra disk while
the latest is the best), replaced only when the validation loss improves, so a run that gets
worse never overwrites its best weights. Next to them, ``config.json`` + ``model.safetensors``
(``save_pretrained``, the latest weights) let ``GPT.from_pretrained(out_dir)`` load it for
evaluation.

A save interrupted by SIGKILL leaves its temporary (``ckpt.pt.*.tmp``, ``best.pt.*.tmp``,
``.pretrained.*/``); ``temporary_paths`` names them so the next run can remove them.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from typing import Optional

import torch

from model import GPT, GPTConfig
from training.original_checkpoint import is_original_folder, load_original
from training.progress import hf_progress_bars_off, on_terminal

CKPT_NAME = "ckpt.pt"          # the latest checkpoint: what --init_from=resume continues
BEST_NAME = "best.pt"          # the checkpoint with the lowest validation loss so far
PRETRAINED_TMP_PREFIX = ".pretrained."
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def clean_state_dict(state: dict) -> dict:
    """Drop the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add, in any order
    and any number (DDP around a compiled model gives 'module._orig_mod.', the reverse order
    '_orig_mod.module.')."""
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
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
    tmp = tempfile.mkdtemp(prefix=PRETRAINED_TMP_PREFIX, dir=out_dir)
    try:
        with hf_progress_bars_off():              # no "Writing model shards" bar at every save
            model.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            src = os.path.join(tmp, name)
            with open(src, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(src, _FILE_MODE)
            os.replace(src, os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(out_dir)


def atomic_link(src: str, dst: str) -> None:
    """Make ``dst`` the same file as ``src`` atomically: a hard link (no copy), or a copy
    where the filesystem has no hard links; a temporary name first, then rename."""
    tmp = f"{dst}.{uuid.uuid4().hex[:12]}.tmp"  # os.link needs a name that does not exist yet
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(dst))


def save_checkpoint(out_dir: str, state: dict, model=None, best: bool = False) -> str:
    """Write ``state`` to ``out_dir/ckpt.pt`` atomically (and, when ``best``, make it
    ``best.pt`` too), then the save_pretrained files."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CKPT_NAME)
    atomic_torch_save(state, path)
    if best:
        atomic_link(path, os.path.join(out_dir, BEST_NAME))
    if model is not None:
        save_pretrained_atomic(model, out_dir)
    return path


def temporary_paths(out_dir: str) -> list[str]:
    """The temporaries a save creates in ``out_dir``; any that exist while no save runs
    were left by a process killed while saving."""
    patterns = [f"{name}.*.tmp" for name in (CKPT_NAME, BEST_NAME)] + [PRETRAINED_TMP_PREFIX + "*"]
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(glob.escape(out_dir), pattern)))


def checkpoint_path(path: str) -> str:
    """``path`` itself if it is a file, else ``path/ckpt.pt``."""
    return path if os.path.isfile(path) else os.path.join(path, CKPT_NAME)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt, or not one of ours."""


def unreadable(path: str, why: str = "") -> CheckpointError:
    return CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt)" + (f": {why}" if why else ""))


def read_checkpoint_file(path: str, map_location="cpu") -> dict:
    """``torch.load`` a checkpoint file; a truncated or corrupt file raises CheckpointError
    naming it (torch's own messages leave out the path or give advice about formats)."""
    with open(path, "rb"):
        pass                                   # missing or unreadable: the OSError says so
    # torch.save writes a zip archive whose directory is at the end: a cut file has none
    if not zipfile.is_zipfile(path):
        raise unreadable(path, "no zip directory at its end")
    try:
        # mmap: the ranks of a node share the file's pages instead of each holding a full copy
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
    except Exception as e:                     # anything torch/pickle raise on damaged content
        raise unreadable(path, str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this repository (it holds a {type(state).__name__})")
    return state


def check_pretrained_folder(folder: str) -> None:
    """Raise CheckpointError naming the file if a save_pretrained folder's config.json or
    safetensors weights are cut or corrupt (reads only the JSON and the safetensors headers)."""
    from safetensors import SafetensorError, safe_open
    config = os.path.join(folder, "config.json")
    try:
        with open(config) as f:
            json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise unreadable(config, f"invalid JSON ({e})") from None
    for weights in sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors"))):
        try:
            with safe_open(weights, framework="pt"):
                pass
        except SafetensorError as e:
            raise unreadable(weights, str(e)) from None


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (folder or file), with a clear error."""
    path = checkpoint_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train with init_from='scratch' first "
                                "or point resume_dir/out_dir at a folder containing ckpt.pt")
    state = read_checkpoint_file(path, map_location)
    for key in ("model", "model_config", "optimizer", "iter_num"):
        if key not in state:
            raise CheckpointError(f"{path} is not a training checkpoint of this repository (no {key!r})")
    return state


def load_model(path: str, map_location="cpu", model_type: Optional[str] = None, **overrides) -> GPT:
    """The model of any checkpoint: a ``save_pretrained`` folder or a training checkpoint file
    (``ckpt.pt``/``best.pt`` with keys ``model`` and ``model_config``; a folder means its
    ``ckpt.pt`` when it has no config.json), of this repository or of the original one
    (``original_checkpoint.py``; ``model_type`` names the original's encoding where its
    parameters do not, e.g. 'llama-mha-rope'). ``overrides`` change config fields that do
    not change the parameters, e.g. ``block_size`` to evaluate beyond the training context."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        check_pretrained_folder(path)
        if is_original_folder(path):
            return load_original(path, model_type, **overrides)
        if model_type is not None:
            raise ValueError(f"{path} is a folder of this repository; model_type is for the original's folders")
        with hf_progress_bars_off(not on_terminal()):   # no bars in log files (tqdm's convention)
            return GPT.from_pretrained(path, **overrides)
    if os.path.isdir(path):
        path = os.path.join(path, CKPT_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path} (expected a save_pretrained folder or ckpt.pt)")
    ckpt = read_checkpoint_file(path, map_location)
    if "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint of this repository (needs 'model' and 'model_config')")
    model = GPT(GPTConfig(**{**ckpt["model_config"], **overrides}))
    model.load_exactly(clean_state_dict(ckpt["model"]), path)
    return model
