"""Checkpoints of the original GRAPE repository, opened here with the same logits.

The original's training script saves ``save_pretrained`` folders (every ``eval_interval``
into ``out_dir``, and ``out_dir/checkpoint-N`` snapshots): ``config.json`` with
``model_type: "gpt2"`` (whatever the encoding), the weights (``pytorch_model.bin``), and
``optimizer.pt`` beside them. ``training.checkpoint.load_model(folder)`` and ``load_original(folder)``
read such a folder; ``python -m scripts.convert_original FOLDER OUT`` writes it as a folder of this
repository.

What the conversion does:
- the encoding: config.json does not name it, so it is read from what the folder says: the
  parameter names (FoX, GRAPE-M, GRAPE-M-ctx, the three GRAPE-A, GRAPE-AP with its own probe
  projection), config.json's ``p_tie_mode`` (GRAPE-AP with a tied probe: pq, pk or pv) and
  ``use_k_shift``, and the folder's name (the original writes to ``out_<model_type>_<N>m_Opt_...``,
  snapshots in ``checkpoint-N`` below it). RoPE and ALiBi have the same parameters: when the
  folder was renamed, ``model_type`` (the original's name, e.g. 'llama-mha-rope') must be given.
  A given ``model_type`` that contradicts the folder is refused (it would load with wrong
  logits); the original's own name without '-kvshift' for a KV-shift run (its configs keep
  the plain name and set ``use_k_shift``) is what the original writes, and is accepted;
- parameter names (``q_rms`` -> ``q_norm``, ``c_k.linear`` + ``c_k.shift_proj`` -> ``c_k`` +
  ``k_shift.gate``, FoX's ``attn.core.*``, GRAPE-A's ``omega/u/v`` ...); values are kept
  (GRAPE-M stores s·log θ in both);
- coordinate order: the original rotates coordinate i with i + d/2 by -nθ, this repository
  rotates 2i with 2i+1 by +nθ. Putting original coordinate i + d/2 at 2i and i at 2i+1 turns
  one into the other, so the rows of every projection that feeds a rotation (q and k for the
  rotary encodings, the probe projection for GRAPE-AP, or what a tied probe is tied to) and
  the matching QK-norm weights are permuted within each head;
- order of QK-norm and rotation: the original normalises after rotating in its RoPE and
  GRAPE-M files; the converted config sets ``qk_norm_after_rotation`` for those.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch
from torch import Tensor

from model import LEGACY_MODEL_TYPES, GPT, GPTConfig, read_weights, settings_from_model_type

ROTARY = ("rope", "grape_m", "grape_m_ctx")
# the original's model types (its model/ files); it has no NoPE model
ORIGINAL_TYPES = sorted(name for name in LEGACY_MODEL_TYPES if name != "llama-mha-nope")
# the original's out_dir: output/out_{model_type}_{N}m_Opt_{optimizer}_LR_..._time_..._jobid_...
OUT_DIR_NAME = re.compile(r"out_(llama-mha-[a-z0-9-]+?)_\d+m_Opt_")
# keys the original writes into config.json that select nothing in its models
IGNORED_KEYS = {"embedding_init_std", "hidden_init_std_factor", "scale_attn_by_inverse_layer_idx",
                "tpa_kvrank", "tpa_qrank", "q_rank", "rank", "group_size"}
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "head_dim", "block_size", "vocab_size", "using_groupnorm",
              "use_qk_rmsnorm", "use_k_shift", "use_v_shift", "grape_learnable_freq", "grape_log_freq_scale",
              "grape_ctx_per_head", "grape_ctx_init_omega", "grape_ctx_omega_scale",
              "keygated_omega_init", "querygated_omega_init", "querykeygated_omega_init",
              "keygated_u_init_std", "keygated_u_l2_norm", "keygated_u_l2_eps",
              "querygated_v_init_std", "querygated_v_l2_norm", "querygated_v_l2_eps", "p_head_dim")
# prefixes of the original's model knobs: one of these that is not known here is an error
KNOB_PREFIXES = r"^(grape_|keygated_|querygated_|querykeygated_|p_|use_|fgate_|tpa_|decay_time)"
TIE_MODES = {"none": "none", "pq": "pq", "pk": "pk", "pv": "pv", "pqtie": "pq", "pktie": "pk", "pvtie": "pv"}


class WrongModelType(ValueError):
    """A model_type the folder contradicts, or none where the folder does not say it
    (``load_model`` reports it as a CheckpointError)."""


def is_original_folder(path: str) -> bool:
    """A save_pretrained folder of the original repository (its config says 'gpt2')."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return False
    with open(config_path) as f:
        return json.load(f).get("model_type") == "gpt2"


def infer_model_type(state: dict[str, Tensor]) -> Optional[str]:
    """The original model_type when the parameter names say it, else None."""
    names = " ".join(state)
    kv = "-kvshift" if re.search(r"\.(c_k|k_proj)\.shift_proj\.", names) else ""
    for marker, model_type in ((".attn.core.", "llama-mha-fox"),
                               (".attn.omega_proj.", "llama-mha-grape-m-ctx"),
                               (".attn.grape.log_freq", "llama-mha-grape-m-nonctx"),
                               (".attn.querykeygated_bias.", "llama-mha-grape-a-querykeygated"),
                               (".attn.keygated_bias.", "llama-mha-grape-a-keygated"),
                               (".attn.querygated_bias.", "llama-mha-grape-a-querygated"),
                               (".attn.c_p.", "llama-mha-grape-ap-v1")):
        if marker in names:
            return model_type + kv
    return None


def config_from_original(original: dict, model_type: str, **overrides) -> GPTConfig:
    """Our GPTConfig for the original's config.json (a dict) and model_type."""
    settings = settings_from_model_type(model_type)
    known = set(MODEL_KEYS) | IGNORED_KEYS | {"bias", "dropout", "rope_base", "grape_base", "grape_share_across_heads",
                                              "p_tie_mode"}
    unknown = [k for k in original if k not in known and re.match(KNOB_PREFIXES, k)]
    if unknown:
        raise ValueError(f"the original config sets {unknown}, which this conversion does not know")
    kwargs = {k: original[k] for k in MODEL_KEYS if k in original}
    kwargs["use_k_shift"] = kwargs.get("use_k_shift", False) or settings["use_k_shift"]
    kwargs["use_v_shift"] = kwargs.get("use_v_shift", False) or settings["use_v_shift"]
    encoding = settings["pos_encoding"]
    if original.get("bias") or original.get("dropout"):
        raise ValueError(f"the original config has bias={original.get('bias')}, dropout={original.get('dropout')}; "
                         "this model has neither")
    if encoding in ("grape_m", "grape_m_ctx"):
        kwargs["rope_base"] = float(original.get("grape_base", 10000.0))
        kwargs["grape_m_per_head"] = not original.get("grape_share_across_heads", True)
    elif encoding == "rope":
        kwargs["rope_base"] = float(original.get("rope_base", 10000.0))
    tie = str(original.get("p_tie_mode", "none")).lower()
    if tie not in TIE_MODES:
        raise ValueError(f"unknown p_tie_mode {tie!r} in the original config")
    kwargs["p_tie_mode"] = TIE_MODES[tie]
    if encoding == "grape_ap" and kwargs["p_tie_mode"] == "none":
        kwargs["p_head_dim"] = original.get("p_head_dim") or original["head_dim"]
    kwargs["qk_norm_after_rotation"] = encoding in ROTARY      # the original's order there
    return GPTConfig(pos_encoding=encoding, **{**kwargs, **overrides})


# -- parameter names and coordinate order ------------------------------------------------

def pair_permutation(d: int) -> Tensor:
    """ours[2i] = original[i + d/2], ours[2i + 1] = original[i]."""
    perm = torch.empty(d, dtype=torch.long)
    perm[0::2] = torch.arange(d // 2) + d // 2
    perm[1::2] = torch.arange(d // 2)
    return perm


def _rows(w: Tensor, perm: Tensor) -> Tensor:            # (H·d, C): permute within each head
    d = perm.numel()
    return w.view(-1, d, w.shape[-1])[:, perm].reshape(w.shape)


def _cols(w: Tensor, perm: Tensor) -> Tensor:            # (C, H·d)
    d = perm.numel()
    return w.view(w.shape[0], -1, d)[:, :, perm].reshape(w.shape)


def _vector(w: Tensor, perm: Tensor) -> Tensor:
    return w[perm]


def layer_names(config: GPTConfig) -> list[tuple[str, str]]:
    """(our name, the original's name) for one block's parameters, relative to the block."""
    fox = config.pos_encoding == "fox"
    attn = "attn.core." if fox else "attn."
    q, k, v = ("q_proj", "k_proj", "v_proj") if fox else ("c_q", "c_k", "c_v")
    q_norm, k_norm, out_norm = ("q_norm", "k_norm", "output_norm") if fox else ("q_rms", "k_rms", "subln")
    names = [("ln_1.weight", "ln_1.weight"), ("ln_2.weight", "ln_2.weight"),
             ("mlp.c_fc1.weight", "mlp.c_fc1.weight"), ("mlp.c_fc2.weight", "mlp.c_fc2.weight"),
             ("mlp.c_proj.weight", "mlp.c_proj.weight"),
             ("attn.c_q.weight", f"{attn}{q}.weight"), ("attn.c_proj.weight", f"{attn}c_proj.weight")]
    for ours, orig, shifted, shift in (("c_k", k, config.use_k_shift, "k_shift"),
                                       ("c_v", v, config.use_v_shift, "v_shift")):
        if shifted:
            names += [(f"attn.{ours}.weight", f"{attn}{orig}.linear.weight"),
                      (f"attn.{shift}.gate.weight", f"{attn}{orig}.shift_proj.weight")]
        else:
            names.append((f"attn.{ours}.weight", f"{attn}{orig}.weight"))
    if config.use_qk_rmsnorm:
        names += [("attn.q_norm.weight", f"{attn}{q_norm}.weight"), ("attn.k_norm.weight", f"{attn}{k_norm}.weight")]
    if config.using_groupnorm:
        names.append(("attn.out_norm.weight", f"{attn}{out_norm}.weight"))
    encoding = {
        "grape_m": [("attn.pos.scaled_log_freq", "attn.grape.log_freq")],
        "grape_m_ctx": [("attn.pos.log_freq", "attn.grape.log_freq"),
                        ("attn.pos.phase_proj.weight", "attn.omega_proj.weight"),
                        ("attn.pos.phase_proj.bias", "attn.omega_proj.bias")],
        "fox": [("attn.pos.forget_proj.weight", "attn.core.fgate_proj.weight"),
                ("attn.pos.forget_proj.bias", "attn.core.fgate_proj.bias")],
        "grape_a_k": [("attn.pos.omega_raw", "attn.keygated_bias.omega"),
                      ("attn.pos.gate_k", "attn.keygated_bias.u")],
        "grape_a_q": [("attn.pos.omega_raw", "attn.querygated_bias.omega"),
                      ("attn.pos.gate_q", "attn.querygated_bias.v")],
        "grape_a_qk": [("attn.pos.omega_raw", "attn.querykeygated_bias.omega"),
                       ("attn.pos.gate_k", "attn.querykeygated_bias.u"),
                       ("attn.pos.gate_q", "attn.querykeygated_bias.v")],
        "grape_ap": [("attn.pos.p_proj.weight", "attn.c_p.weight")] if config.p_tie_mode == "none" else [],
    }
    return names + encoding.get(config.pos_encoding, [])


def permutations(config: GPTConfig) -> dict[str, tuple]:
    """Our names (relative to a block) whose coordinates are reordered, with how."""
    perm = pair_permutation(config.head_dim)
    qk = {"attn.c_q.weight": (_rows, perm), "attn.c_k.weight": (_rows, perm),
          "attn.q_norm.weight": (_vector, perm), "attn.k_norm.weight": (_vector, perm)}
    if config.pos_encoding in ROTARY:
        return qk
    if config.pos_encoding == "grape_ap":
        if config.p_tie_mode == "none":
            return {"attn.pos.p_proj.weight": (_rows, pair_permutation(config.p_head_dim))}
        if config.p_tie_mode in ("pq", "pk"):
            return qk
        return {"attn.c_v.weight": (_rows, perm), "attn.c_proj.weight": (_cols, perm),
                "attn.out_norm.weight": (_vector, perm)}
    return {}


def name_map(config: GPTConfig) -> dict[str, str]:
    """Our full parameter name -> the original's, for every parameter."""
    out = {"transformer.wte.weight": "transformer.wte.weight", "transformer.ln_f.weight": "ln_f.weight"}
    for i in range(config.n_layer):
        for ours, orig in layer_names(config):
            out[f"transformer.h.{i}.{ours}"] = f"transformer.h.{i}.{orig}"
    return out


def from_original(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """The original's tensors (parameters, or their gradients) under our names and order."""
    if "transformer.wte.weight" not in state and "lm_head.weight" in state:
        state = {**state, "transformer.wte.weight": state["lm_head.weight"]}     # tied
    perms = permutations(config)
    out, missing = {}, []
    for ours, orig in name_map(config).items():
        if orig not in state:
            missing.append(orig)
            continue
        tensor = state[orig]
        fn = perms.get(ours.split(".", 3)[-1]) if ours.startswith("transformer.h.") else None
        out[ours] = fn[0](tensor, fn[1]) if fn else tensor
    if missing:
        raise ValueError(f"the original checkpoint lacks {missing[:4]} (of {len(missing)}) for "
                         f"pos_encoding={config.pos_encoding!r}: wrong model_type?")
    return out


def to_original(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Our tensors under the original's names and order (the inverse of ``from_original``)."""
    perms = permutations(config)
    out = {}
    for ours, orig in name_map(config).items():
        tensor = state[ours]
        fn = perms.get(ours.split(".", 3)[-1]) if ours.startswith("transformer.h.") else None
        out[orig] = fn[0](tensor, torch.argsort(fn[1])) if fn else tensor
    return out


def model_type_in_name(path: str) -> Optional[str]:
    """The model_type the original's out_dir name carries (the folder, or the run folder above
    a checkpoint-N snapshot), or None for a renamed folder."""
    folder = os.path.abspath(path)
    for name in (os.path.basename(folder), os.path.basename(os.path.dirname(folder))):
        match = OUT_DIR_NAME.match(name)
        if match:
            return match.group(1)
    return None


def tied_probe(original: dict) -> bool:
    return TIE_MODES.get(str(original.get("p_tie_mode", "none")).lower(), "none") != "none"


def encoding_of(model_type: str) -> str:
    """pos_encoding of one of the original's model types; an error naming them for any other."""
    name = model_type.lower().replace("_", "-").replace("-kv-shift", "").replace("-kvshift", "")
    if name not in ORIGINAL_TYPES:
        why = "the original repository has no NoPE model" if name == "llama-mha-nope" else "unknown model_type"
        raise WrongModelType(f"{why} ({model_type!r}); the original's model types are {ORIGINAL_TYPES} "
                             "(optionally with '-kvshift')")
    return settings_from_model_type(model_type)["pos_encoding"]


def resolve_model_type(path: str, original: dict, state: dict, model_type: Optional[str]) -> str:
    """The model_type to load the folder with: the given one if nothing in the folder contradicts
    it, else what the folder says; CheckpointError when they disagree or nothing says it."""
    inferred = infer_model_type(state)
    tied, named = tied_probe(original), model_type_in_name(path)
    kv_in_folder = ".shift_proj." in " ".join(state)
    if model_type is None:
        chosen = inferred or ("llama-mha-grape-ap-v1" if tied else named)
        if chosen is None:
            raise WrongModelType(f"{path}: RoPE and ALiBi have the same parameters, and neither its config.json "
                                 "nor its folder name (the original's out_<model_type>_...) says which; pass the "
                                 "original's model_type: 'llama-mha-rope' or 'llama-mha-alibi'")
        encoding_of(chosen)
        return chosen
    given = encoding_of(model_type)
    said = [(f"its parameters are those of {inferred!r}", inferred and encoding_of(inferred)),
            (f"its config.json sets p_tie_mode={original.get('p_tie_mode')!r}, a GRAPE-AP with a tied probe "
             "('llama-mha-grape-ap-v1')", "grape_ap" if tied else None),
            (f"its folder name says it was trained as {named!r}", named and encoding_of(named))]
    for what, encoding in said:
        if encoding and encoding != given:
            raise WrongModelType(f"{path}: {what}, not model_type={model_type!r}")
    if inferred is None and not tied and given not in ("rope", "alibi"):
        raise WrongModelType(f"{path}: its parameters are those of RoPE or ALiBi (GRAPE-AP has its own probe "
                             f"projection c_p, or a p_tie_mode in config.json), not of model_type={model_type!r}")
    if settings_from_model_type(model_type)["use_k_shift"] and not kv_in_folder:
        raise WrongModelType(f"{path}: model_type={model_type!r} asks for KV-shift, but the folder has no KV-shift "
                             f"parameters (config.json: use_k_shift={original.get('use_k_shift', False)})")
    return model_type


def load_original(path: str, model_type: Optional[str] = None, **overrides) -> GPT:
    """Our GPT with the weights of an original save_pretrained folder (same logits)."""
    with open(os.path.join(path, "config.json")) as f:
        original = json.load(f)
    state = read_weights(path)
    model_type = resolve_model_type(path, original, state, model_type)
    config = config_from_original(original, model_type, **overrides)
    model = GPT(config)
    converted = from_original(state, config)
    full = model.state_dict()
    full.update(converted)             # buffers (RoPE spectrum, ALiBi slopes) stay ours
    model.load_state_dict(full, strict=True)
    return model
