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

Loading runs no code from the file. A checkpoint is read with ``torch.load(weights_only=True)``:
tensors and plain containers (dict, list, tuple, str, numbers, None) only; a pickled object whose
unpickling would call something (``__reduce__``) is refused with one line. So everything a save
writes is plain: the numpy RNG state, the one piece of the training state that is not, is
stored as a list (``numpy_rng_state``), and ``save_checkpoint`` checks the whole state before
writing. Checkpoints written before this (their numpy RNG state is a pickled numpy array) load
only when the user trusts them: ``trust_pickle=True`` here, ``--trust_checkpoint_pickle=True`` in
training, or ``GRAPE_TRUST_CHECKPOINT_PICKLE=1`` for every program; unpickling such a file can
run any code it carries.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch

from model import GPT, GPTConfig
from modeling.hf_forward import refused_global
from training.original_checkpoint import WrongModelType, is_original_folder, load_original
from training.progress import hf_progress_bars_off, on_terminal

TRUST_PICKLE_ENV = "GRAPE_TRUST_CHECKPOINT_PICKLE"   # =1: load checkpoints that need the full unpickler
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


def fsync_dir(path: str) -> None:
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


class DiskFull(OSError):
    """The disk filled while a checkpoint was written (``what``: the file); nothing of it was put in place."""

    def __init__(self, what: str, folder: str):
        super().__init__(errno.ENOSPC, f"disk full while writing {what} in {folder}")
        self.what = what


def free_bytes(folder: str) -> int:
    stats = os.statvfs(folder)
    return (stats.f_bfree if os.geteuid() == 0 else stats.f_bavail) * stats.f_frsize


def raise_if_disk_full(error: BaseException, folder: str, what: str) -> None:
    """Call while the partial file still exists: DiskFull if ``error`` came from a full disk.
    torch.save reports a short write as a bare RuntimeError ('unexpected pos'), so the free
    space decides when no errno says it."""
    errors, e = [], error
    while e is not None and len(errors) < 8:
        errors.append(e)
        e = e.__cause__ or e.__context__
    if not any(isinstance(x, Exception) for x in errors):
        return                                 # KeyboardInterrupt, SystemExit
    full = any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(x)
               for x in errors)
    if full or free_bytes(folder) < 1 << 20:
        raise DiskFull(what, folder) from error


def write_temporary(obj, path: str) -> str:
    """torch.save to a fsync'ed temporary file beside ``path``; returns its name. Nothing is
    left behind if it fails (DiskFull when the disk filled)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)               # mkstemp makes 0600 files; use the usual umask
    except BaseException as e:
        try:
            raise_if_disk_full(e, folder, os.path.basename(path))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    return tmp


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = write_temporary(obj, path)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def stage_pretrained(model, out_dir: str, run_facts: Optional[dict] = None) -> str:
    """``model.save_pretrained`` into a new temporary folder inside ``out_dir`` (files fsync'ed);
    returns the folder. Nothing is left behind if it fails (DiskFull when the disk filled).
    ``run_facts`` go into the folder's model card (README.md)."""
    refuse_repository(out_dir)
    tmp = tempfile.mkdtemp(prefix=PRETRAINED_TMP_PREFIX, dir=out_dir)
    try:
        with hf_progress_bars_off():              # no "Writing model shards" bar at every save
            model.save_pretrained(tmp, run_facts=run_facts)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
            os.chmod(os.path.join(tmp, name), _FILE_MODE)
    except BaseException as e:
        try:
            raise_if_disk_full(e, out_dir, "the save_pretrained files")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def refuse_repository(out_dir: str) -> None:
    """The shipped code files (model.py, grape.py, attention.py, ...) must never replace the
    repository's own: refuse its root and its modeling/ folder as a destination."""
    from modeling import shipping
    if os.path.realpath(out_dir) in (os.path.realpath(shipping.ROOT), os.path.realpath(shipping.PACKAGE_DIR)):
        raise CheckpointError(f"refusing to save a checkpoint into the repository itself ({out_dir}): its code "
                              "files would replace model.py and the modules it imports; choose another folder")


def commit_pretrained(tmp: str, out_dir: str) -> None:
    """Move each file of a staged save_pretrained folder into ``out_dir`` (atomic per file)."""
    for name in sorted(os.listdir(tmp)):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(out_dir)


def save_pretrained_atomic(model, out_dir: str) -> None:
    """``model.save_pretrained`` into a temporary folder, then move each file into ``out_dir``."""
    commit_pretrained(stage_pretrained(model, out_dir), out_dir)


def link_temporary(src: str, dst: str) -> str:
    """A temporary name beside ``dst`` for the same file as ``src``: a hard link (no copy), or a
    copy where the filesystem has no hard links."""
    tmp = f"{dst}.{uuid.uuid4().hex[:12]}.tmp"  # os.link needs a name that does not exist yet
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    except BaseException as e:
        try:
            raise_if_disk_full(e, os.path.dirname(os.path.abspath(dst)), os.path.basename(dst))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    return tmp


def atomic_link(src: str, dst: str) -> None:
    """Make ``dst`` the same file as ``src`` atomically: a temporary name first, then rename."""
    os.replace(link_temporary(src, dst), dst)
    fsync_dir(os.path.dirname(dst))


def save_checkpoint(out_dir: str, state: dict, model=None, best: bool = False) -> str:
    """Write ``state`` to ``out_dir/ckpt.pt`` (and, when ``best``, make it ``best.pt`` too) and
    the save_pretrained files of ``model``. Every file is first written complete under a
    temporary name; only then are they renamed into place, so a full disk (DiskFull) or a
    crash while writing leaves the previous ckpt.pt, best.pt and weights as they were, of one
    iteration."""
    check_plain(state)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CKPT_NAME)
    staged, pretrained = [], None
    try:
        if model is not None:
            pretrained = stage_pretrained(model, out_dir, run_facts(state))
        staged.append((write_temporary(state, path), path))
        if best:
            staged.append((link_temporary(staged[0][0], os.path.join(out_dir, BEST_NAME)),
                           os.path.join(out_dir, BEST_NAME)))
    except BaseException:
        for tmp, _ in staged:
            os.remove(tmp)
        if pretrained is not None:
            shutil.rmtree(pretrained, ignore_errors=True)
        raise
    for tmp, final in staged:                    # renames: no space needed, nothing left to fail on
        os.replace(tmp, final)
    if pretrained is not None:
        commit_pretrained(pretrained, out_dir)
    fsync_dir(out_dir)
    return path


def run_facts(state: dict) -> dict:
    """What the model card says about the run, from a training checkpoint's state."""
    config = state.get("config") or {}
    dataset = config.get("data_dir") or config.get("dataset")
    return {"iteration": state.get("iter_num"), "tokens": state.get("tokens"), "val_loss": state.get("val_loss"),
            "best_val_loss": state.get("best_val_loss"), "dataset": dataset}


PLAIN_TYPES = (str, int, float, bool, bytes, type(None), torch.Tensor, torch.dtype, torch.Size, torch.device)


def check_plain(obj, where: str = "state") -> None:
    """Raise TypeError naming the first value ``torch.load(weights_only=True)`` would refuse:
    a checkpoint must hold tensors and plain containers only, or no loader could read it."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            check_plain(key, f"{where} key")
            check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple, set)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, PLAIN_TYPES) or type(obj).__module__ == "numpy":
        raise TypeError(f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__name__}; a checkpoint holds "
                        "tensors and plain Python values only (weights_only loading refuses anything else)")


def numpy_rng_state() -> tuple:
    """numpy's global RNG state with its key array as a list: a plain value a checkpoint can
    hold (``np.random.set_state`` takes it back as it is)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (str(name), keys.tolist(), int(pos), int(has_gauss), float(cached))


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


def trusts_pickle(trust_pickle: bool = False) -> bool:
    """Whether the caller, or the environment (GRAPE_TRUST_CHECKPOINT_PICKLE=1), trusts checkpoint
    files enough to unpickle arbitrary objects."""
    return bool(trust_pickle) or os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def read_checkpoint_file(path: str, map_location="cpu", trust_pickle: bool = False) -> dict:
    """``torch.load`` a checkpoint file with ``weights_only=True``: tensors and plain values, no
    code runs. A file that holds other objects is refused with one line (a CheckpointError),
    unless ``trust_pickle`` (or GRAPE_TRUST_CHECKPOINT_PICKLE=1) allows the full unpickler; a
    truncated or corrupt file raises CheckpointError naming it."""
    with open(path, "rb"):
        pass                                   # missing or unreadable: the OSError says so
    # torch.save writes a zip archive whose directory is at the end: a cut file has none
    if not zipfile.is_zipfile(path):
        raise unreadable(path, "no zip directory at its end")
    trusted = trusts_pickle(trust_pickle)
    try:
        # mmap: the ranks of a node share the file's pages instead of each holding a full copy
        state = torch.load(path, map_location=map_location, weights_only=not trusted, mmap=True)
    except Exception as e:                     # anything torch/pickle raise on damaged content
        refused = None if trusted else refused_global(e)
        if refused is not None:
            raise CheckpointError(
                f"{path} holds Python objects that loading would run (pickle global {refused}), so it is refused. "
                f"Checkpoints of this repository written before checkpoints became plain data keep numpy's RNG "
                f"state that way; if you trust this file, pass --trust_checkpoint_pickle=True (training) or set "
                f"{TRUST_PICKLE_ENV}=1, knowing that unpickling it can run any code it carries") from None
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


def load_checkpoint(path: str, map_location="cpu", trust_pickle: bool = False) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (folder or file), with a clear error."""
    path = checkpoint_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train with init_from='scratch' first "
                                "or point resume_dir/out_dir at a folder containing ckpt.pt")
    state = read_checkpoint_file(path, map_location, trust_pickle)
    for key in ("model", "model_config", "optimizer", "iter_num"):
        if key not in state:
            raise CheckpointError(f"{path} is not a training checkpoint of this repository (no {key!r})")
    return state


def load_model(path: str, map_location="cpu", model_type: Optional[str] = None, trust_pickle: bool = False,
               **overrides) -> GPT:
    """The model of any checkpoint: a ``save_pretrained`` folder or a training checkpoint file
    (``ckpt.pt``/``best.pt`` with keys ``model`` and ``model_config``; a folder means its
    ``ckpt.pt`` when it has no config.json), of this repository or of the original one
    (``original_checkpoint.py``; ``model_type`` names the original's encoding where its
    parameters do not, e.g. 'llama-mha-rope'). ``overrides`` change config fields that do
    not change the parameters, e.g. ``block_size`` to evaluate beyond the training context.
    Nothing read runs code (``read_checkpoint_file``; weight files through ``hf_forward.read_weights``);
    ``trust_pickle`` admits the training checkpoints of earlier versions."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        check_pretrained_folder(path)
        if is_original_folder(path):
            try:
                return load_original(path, model_type, **overrides)
            except WrongModelType as e:
                raise CheckpointError(str(e)) from None
        if model_type is not None:
            raise ValueError(f"{path} is a folder of this repository; model_type is for the original's folders")
        with hf_progress_bars_off(not on_terminal()), cannot_build(path):   # no bars in log files
            return GPT.from_pretrained(path, **overrides)
    if os.path.isdir(path):
        path = os.path.join(path, CKPT_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path} (expected a save_pretrained folder or ckpt.pt)")
    ckpt = read_checkpoint_file(path, map_location, trust_pickle)
    if "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint of this repository (needs 'model' and 'model_config')")
    with cannot_build(path):
        model = GPT(GPTConfig(**{**ckpt["model_config"], **overrides}))
        model.load_exactly(clean_state_dict(ckpt["model"]), path)
    return model


@contextmanager
def cannot_build(path: str):
    """A config whose values the model refuses, or weights that do not fit it: CheckpointError
    naming ``path`` in one line (torch and transformers spread theirs over many)."""
    try:
        yield
    except (CheckpointError, OSError):
        raise                                  # already one line naming the file
    except Exception as e:                     # ValueError, TypeError, torch's RuntimeError, hf's validation errors
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path} cannot be loaded: its config and weights do not describe a model this "
                              f"repository can build ({detail[:300]})") from None
