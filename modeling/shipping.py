"""What makes a ``save_pretrained`` folder open in every Hugging Face tool without this repository.

transformers runs a model it does not ship ("remote code", ``trust_remote_code=True``) from the
``.py`` files in the checkpoint folder that ``config.json``'s ``auto_map`` names, plus the files
those import relatively (``from .grape import ...``), all flat in the folder. Our modules import
each other absolutely (``from grape import ...``) so that they run from the repository root, so
``write_code`` follows the model module's imports (inside functions too) to every repository
module it needs and writes each into the folder with those imports made relative; the modules
themselves stay the single source. ``complete_folder`` adds the GPT-2 tokenizer, built offline
from the local BPE files (``tokenizer.py``), so ``AutoTokenizer``, ``pipeline`` and lm_eval's
``hf`` model work on the folder too.

transformers checks, before running remote code, that every package a shipped file imports is
installed; it skips imports inside ``try`` blocks, so optional packages (triton) are imported there.
"""
from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL_MODULE = "model"     # the module whose classes auto_map names (model.GPTConfig, model.GPT)


def _local_imports(path: str) -> list[tuple[ast.ImportFrom, str]]:
    """(node, module name) for every ``from x import`` of a sibling module x of ``path``, at any
    depth (imports inside functions included)."""
    folder = os.path.dirname(path)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if os.path.isfile(os.path.join(folder, alias.name.split(".")[0] + ".py")):
                    raise ValueError(f"{path}:{node.lineno}: 'import {alias.name}' of a repository module "
                                     "cannot ship as remote code (transformers only follows 'from .x import y'); "
                                     f"write 'from {alias.name} import ...'")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            name = node.module.split(".")[0]
            if os.path.isfile(os.path.join(folder, name + ".py")):
                if "." in node.module:
                    raise ValueError(f"{path}:{node.lineno}: 'from {node.module} import' is not a flat module")
                found.append((node, name))
    return found


def code_files(module: str = MODEL_MODULE) -> dict[str, str]:
    """{file name: source} for ``module`` and every sibling module it imports, directly or
    through others, with those imports rewritten as relative ones (``from .grape import``)."""
    files, todo = {}, [module]
    while todo:
        name = todo.pop()
        if name + ".py" in files:
            continue
        path = os.path.join(ROOT, name + ".py")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        for node, dep in _local_imports(path):     # 'from grape import X' -> 'from .grape import X'
            todo.append(dep)
            i, col = node.lineno - 1, node.col_offset
            head = re.match(r"from\s+" + re.escape(node.module) + r"\b", lines[i][col:])
            if head is None or lines[i][:col].strip():
                raise ValueError(f"{path}:{node.lineno}: put 'from {node.module} import ...' on its own "
                                 "line so transformers can follow it as a relative import")
            lines[i] = lines[i][:col] + "from ." + node.module + lines[i][col + head.end():]
        files[name + ".py"] = "".join(lines)
    return files


def write_code(folder: str, module: str = MODEL_MODULE) -> list[str]:
    """Write ``code_files(module)`` into ``folder``; returns the file names."""
    if os.path.realpath(folder) == os.path.realpath(ROOT):
        raise ValueError(f"refusing to save a checkpoint into the repository itself ({ROOT}): its code files "
                         "would replace model.py and the modules it imports; choose another folder")
    files = code_files(module)
    for name, source in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(source)
    return sorted(files)


def complete_folder(model, folder: str) -> None:
    """Add the modelling code and the GPT-2 tokenizer to a folder ``model.save_pretrained``
    wrote (config.json already carries ``auto_map``, see ``model.GPTConfig``)."""
    from tokenizer import gpt2_hf_tokenizer
    write_code(folder, type(model).__module__)
    gpt2_hf_tokenizer(model_max_length=model.config.block_size).save_pretrained(folder)
