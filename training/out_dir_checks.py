"""What out_dir must be before a run writes anything there: a usable path, a folder that holds
only what training runs write, and room for a checkpoint.

A run writes its checkpoints, its log, the ``save_pretrained`` files and the modelling code
(``model.py``, ``grape.py``, ...) into out_dir, and ``--overwrite_out_dir=True`` removes what an
earlier run left there. Both would destroy a folder that holds anything else: the repository
itself (``--out_dir=.``), a home directory, a data folder. So out_dir may hold only the names a
run writes; a ``.py`` file counts as a run's only beside a ``config.json`` that this repository
wrote (a folder of bare source files is someone's code). Everything here only reads.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil

from training.checkpoint import BEST_NAME, CKPT_NAME, PRETRAINED_TMP_PREFIX, temporary_paths

LOCK_NAME = ".lock"
LOG_NAME = "log.jsonl"
REPLACED_PREFIX = ".replaced."        # an overwritten run's files, on their way out (run_dir.py)
# what save_pretrained and the tokenizer write besides the code files, and what wandb adds
SAVED_NAMES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
               "added_tokens.json", "chat_template.jinja"}
RUN_NAMES = {CKPT_NAME, BEST_NAME, LOG_NAME, LOCK_NAME, "wandb"} | SAVED_NAMES
CARD_NAME = "README.md"               # the model card save_pretrained writes (modeling/shipping.py)
SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors$")
TEMPORARY_NAME = re.compile(rf"^(({re.escape(CKPT_NAME)}|{re.escape(BEST_NAME)})\..*\.tmp"
                            rf"|{re.escape(PRETRAINED_TMP_PREFIX)}.*|{re.escape(REPLACED_PREFIX)}.*)$")
# room inside out_dir for the longest path a run writes (wandb's files are the deepest)
LONGEST_INSIDE = 160


class OutDirError(RuntimeError):
    """out_dir cannot be used: a bad path, another run's lock, or files a run must not touch."""


def check_path(out_dir: str) -> None:
    """Refuse an empty out_dir, a file, a path under a file, and a path too long for the
    filesystem (which would otherwise fail only at the first save, after training)."""
    if not out_dir.strip():
        raise OutDirError("out_dir is empty; give the folder the run writes to, e.g. --out_dir=out")
    path = os.path.abspath(out_dir)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutDirError(f"{out_dir} is a file, not a folder; choose a folder for the run")
    existing = path
    while not os.path.isdir(existing):
        if os.path.lexists(existing):
            raise OutDirError(f"cannot create out_dir {out_dir}: {existing} is a file, not a folder")
        existing = os.path.dirname(existing)
    name_max = os.pathconf(existing, "PC_NAME_MAX")
    path_max = os.pathconf(existing, "PC_PATH_MAX")
    for part in path.split(os.sep):
        if len(os.fsencode(part)) > name_max:
            raise OutDirError(f"out_dir {out_dir} is too long for this filesystem: its part {part[:32]}... has "
                              f"{len(os.fsencode(part))} bytes, and a name may have at most {name_max} here")
    if len(os.fsencode(path)) + LONGEST_INSIDE > path_max:
        raise OutDirError(f"out_dir {out_dir} is too long for this filesystem: {len(os.fsencode(path))} bytes, and "
                          f"the files a run writes in it add up to {LONGEST_INSIDE} more (at most {path_max} in all); "
                          "choose a shorter path")


def written_by_this_repository(config_path: str) -> bool:
    """A save_pretrained config.json of this repository (not the original's, not anyone else's)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f).get("model_type") == "grape_gpt"
    except (OSError, ValueError, AttributeError):
        return False


def is_run_entry(out_dir: str, name: str, code_names: frozenset[str]) -> bool:
    if name in RUN_NAMES or SHARD_NAME.match(name) or TEMPORARY_NAME.match(name):
        return True
    # the code files and the model card (README.md) are a run's only beside its config.json
    return (name in code_names or name == CARD_NAME) and written_by_this_repository(
        os.path.join(out_dir, "config.json"))


@functools.lru_cache(maxsize=1)
def shipped_code_names() -> frozenset[str]:
    """The .py files save_pretrained ships (found by reading model.py's imports, once)."""
    from modeling.shipping import code_files
    return frozenset(code_files())


def foreign_entries(out_dir: str) -> list[str]:
    """What out_dir holds that no training run writes ([] for a missing folder)."""
    if not os.path.isdir(out_dir):
        return []
    code_names = shipped_code_names()
    foreign = [name for name in os.listdir(out_dir) if not is_run_entry(out_dir, name, code_names)]
    return sorted(foreign, key=lambda name: (name.startswith("."), name))     # hidden ones last


def check_contents(out_dir: str) -> None:
    """OutDirError if out_dir holds files a run does not write: a run would overwrite some of
    them (model.py, config.json, ...) and --overwrite_out_dir would delete the rest."""
    foreign = foreign_entries(out_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutDirError(f"{out_dir} holds files that no training run writes ({shown}); a run writes its "
                          "checkpoints, code and log into out_dir and would overwrite or remove them: choose an "
                          "empty or new folder")


def run_entries(out_dir: str) -> list[str]:
    """The files an earlier run left in out_dir (not the lock, not temporaries)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(name for name in os.listdir(out_dir) if name != LOCK_NAME and not TEMPORARY_NAME.match(name))


def stale_paths(out_dir: str) -> list[str]:
    """Temporaries of interrupted saves and overwrites (remove them only with the lock held)."""
    replaced = glob.glob(os.path.join(glob.escape(out_dir), REPLACED_PREFIX + "*"))
    return sorted(temporary_paths(out_dir) + replaced)


def checkpoint_bytes(model) -> int:
    """About what one save needs on disk while the previous checkpoint still exists: the weights
    in ckpt.pt, AdamW's two moments, the weights again in model.safetensors, plus the tokenizer
    and code (a few MB)."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return 4 * weights + 8 * 2 ** 20


def check_free_space(out_dir: str, need: int) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise OutDirError(f"{out_dir} has {human(free)} free, but saving a checkpoint there needs about "
                          f"{human(need)} (weights, optimizer state and the save_pretrained copy); free some space "
                          "or choose another out_dir")


def human(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
