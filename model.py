"""One LLaMA-style decoder whose attention takes its positional encoding from ``grape.py``.

Pre-norm blocks, no biases, RMSNorm, optional QK-RMSNorm, SwiGLU MLP, tied embeddings,
optional KV-shift. ``GPT.forward(idx, targets)`` returns ``(logits, loss)`` like nanoGPT;
the classes are ``transformers`` config/model classes so ``save_pretrained`` /
``from_pretrained`` work on the checkpoints, and a saved folder carries this code as remote
code (``hf_checkpoint.py``), so ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` opens it without this repository.
"""

import importlib
import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from attention import attend
from generation import StreamingGenerationMixin, hf_forward, sample
from grape import LayerCache, build_encoding, check_encoding_name

ROTARY_ENCODINGS = ("rope", "grape_m", "grape_m_ctx", "grape_m_basis")

# The original repository's model_type strings, mapped onto pos_encoding.
LEGACY_MODEL_TYPES = {
    "llama-mha-nope": "nope",
    "llama-mha-rope": "rope",
    "llama-mha-alibi": "alibi",
    "llama-mha-fox": "fox",
    "llama-mha-grape-m-nonctx": "grape_m",
    "llama-mha-grape-m-ctx": "grape_m_ctx",
    "llama-mha-grape-a-querygated": "grape_a_q",
    "llama-mha-grape-a-keygated": "grape_a_k",
    "llama-mha-grape-a-querykeygated": "grape_a_qk",
    "llama-mha-grape-ap-v1": "grape_ap",
}


def settings_from_model_type(model_type: str) -> dict:
    """``'llama-mha-fox-kvshift'`` -> ``{'pos_encoding': 'fox', 'use_k_shift': True, 'use_v_shift': True}``.

    A ``kvshift`` marker anywhere in the name (``-kvshift``, ``_kvshift``) turns on KV-shift.
    """
    name = model_type.lower().replace("_", "-")
    kv_shift = "kvshift" in name or "kv-shift" in name
    for marker in ("-kvshift", "-kv-shift"):
        name = name.replace(marker, "")
    if name not in LEGACY_MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(LEGACY_MODEL_TYPES)} "
                         "(optionally with a '-kvshift' suffix)")
    return {"pos_encoding": LEGACY_MODEL_TYPES[name], "use_k_shift": kv_shift, "use_v_shift": kv_shift}


EOT = 50256  # GPT-2's <|endoftext|>: bos and eos (tokenizer.py)

# Where transformers finds these classes in a saved folder, which carries this module's file
# and the modules it imports (hf_checkpoint.write_code).
AUTO_MAP = {"AutoConfig": f"{__name__.split('.')[-1]}.GPTConfig",
            "AutoModelForCausalLM": f"{__name__.split('.')[-1]}.GPT"}


@strict
class GPTConfig(PretrainedConfig):
    model_type = "grape_gpt"
    # the standard names tools read (lm_eval's context length, accelerate's layer count)
    attribute_map = {"max_position_embeddings": "block_size", "hidden_size": "n_embd",
                     "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    head_dim: Optional[int] = None            # default n_embd // n_head
    pos_encoding: str = "rope"
    rope_base: float = 10000.0
    grape_log_freq_scale: float = 16.0        # GRAPE-M: stored log-frequency is divided by this
    grape_m_per_head: bool = False            # GRAPE-M: one spectrum per head instead of shared
    grape_ctx_per_head: bool = False          # GRAPE-M-ctx: one phase increment per head
    grape_nc_planes: int = 4                  # non-commuting GRAPE-M: rank-2 generators per head
    p_head_dim: int = 8                       # GRAPE-AP probe width
    p_tie_mode: str = "none"                  # GRAPE-AP: none | pq | pk | pv
    use_qk_rmsnorm: bool = True
    using_groupnorm: bool = False             # RMSNorm per head on the attention output
    use_k_shift: bool = False
    use_v_shift: bool = False
    norm_eps: float = 1e-5
    attn_backend: str = "auto"
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        super().__post_init__(**kwargs)
        # What a saved config.json tells transformers: where the code is, and GPT-2's
        # <|endoftext|> as bos/eos, so that generate() stops there (generation_config.json).
        for key, default in (("auto_map", dict(AUTO_MAP)), ("bos_token_id", EOT), ("eos_token_id", EOT)):
            if getattr(self, key, None) is None:
                setattr(self, key, default)
        self.check()

    def check(self) -> None:
        """Clear errors for settings the model cannot run with."""
        parts = check_encoding_name(self.pos_encoding)
        if self.n_head * self.head_dim != self.n_embd:
            raise ValueError(f"n_head * head_dim must equal n_embd, got {self.n_head} * {self.head_dim} != {self.n_embd}")
        if any(p in ROTARY_ENCODINGS for p in parts) and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for the rotary encoding {self.pos_encoding!r}")
        if "grape_ap" in parts and self.p_tie_mode == "none" and self.p_head_dim % 2:
            raise ValueError(f"p_head_dim={self.p_head_dim} must be even (GRAPE-AP probes rotate in planes)")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class TokenShift(nn.Module):
    """KV-shift: y_t = a_t y_{t-1} + (1 - a_t) y_t, a_t = sigmoid(w_h·x_t) per head, y_{-1} = 0."""

    def __init__(self, config, name: str):
        super().__init__()
        self.name = name
        self.gate = nn.Linear(config.n_embd, config.n_head, bias=False)

    def forward(self, x: Tensor, y: Tensor, cache: Optional[LayerCache]) -> Tensor:
        # y: (B, H, T, D) projections of this chunk; the cache holds the previous chunk's last one
        prev_last = cache.get(self.name) if cache is not None else None
        if prev_last is None:
            prev_last = torch.zeros_like(y[:, :, :1])
        prev = torch.cat([prev_last, y[:, :, :-1]], dim=2)
        if cache is not None:
            cache.set(self.name, y[:, :, -1:])
        a = torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1).to(y.dtype)  # (B, H, T, 1)
        return a * prev + (1 - a) * y


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.backend = config.attn_backend
        C = config.n_embd
        self.c_q = nn.Linear(C, C, bias=False)
        self.c_k = nn.Linear(C, C, bias=False)
        self.c_v = nn.Linear(C, C, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.use_qk_rmsnorm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.use_qk_rmsnorm else nn.Identity()
        self.out_norm = RMSNorm(self.head_dim, config.norm_eps) if config.using_groupnorm else nn.Identity()
        self.k_shift = TokenShift(config, "k_shift_last") if config.use_k_shift else None
        self.v_shift = TokenShift(config, "v_shift_last") if config.use_v_shift else None
        self.pos = build_encoding(config)

    def heads(self, y: Tensor) -> Tensor:
        B, T, _ = y.shape
        return y.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def project(self, x: Tensor, cache: Optional[LayerCache] = None):
        """q, k, v per head after KV-shift and QK-norm, before the positional encoding."""
        q, k, v = self.heads(self.c_q(x)), self.heads(self.c_k(x)), self.heads(self.c_v(x))
        if self.k_shift is not None:
            k = self.k_shift(x, k, cache)
        if self.v_shift is not None:
            v = self.v_shift(x, v, cache)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.project(x, cache)
        offset = cache.length if cache is not None else 0
        q, k, bias = self.pos(x, q, k, v=v, offset=offset, cache=cache)
        if cache is not None:
            k, v = cache.extend("k", k), cache.extend("v", v)
            cache.length += T
        y = attend(q, k, v, bias, self.backend)
        y = self.out_norm(y).transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = int(8 / 3 * config.n_embd)
        self.c_fc1 = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_fc2 = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.silu(self.c_fc1(x)) * self.c_fc2(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class LMOutput(NamedTuple):
    """``logits, loss = model(idx, targets)`` as in nanoGPT, and ``model(idx).logits`` as tools
    written for transformers models read it (lm_eval's hf model)."""
    logits: Tensor
    loss: Optional[Tensor]


class GPT(PreTrainedModel, StreamingGenerationMixin):
    config_class = GPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"     # what transformers' generate() looks for
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.reset_parameters()
        self.post_init()

    # -- init -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Embedding N(0, 0.02); matrices N(0, 0.5/√C); residual outputs also / √n_layer.
        Encodings keep the init they chose themselves."""
        C, L = self.config.n_embd, self.config.n_layer
        std = 0.5 / math.sqrt(C)
        nn.init.normal_(self.transformer.wte.weight, std=0.02)
        for block in self.transformer.h:
            for name, module in block.named_modules():
                if name.startswith("attn.pos"):
                    continue
                if isinstance(module, nn.Linear):
                    residual_out = name in ("attn.c_proj", "mlp.c_proj")
                    nn.init.normal_(module.weight, std=std / math.sqrt(L) if residual_out else std)
                elif isinstance(module, RMSNorm):
                    nn.init.ones_(module.weight)

    def _init_weights(self, module):
        # All initialisation happens in reset_parameters; transformers must not redo it.
        pass

    # -- forward ----------------------------------------------------------------------
    def forward(self, idx: Optional[Tensor] = None, targets: Optional[Tensor] = None,
                caches: Optional[list[LayerCache]] = None, logits_to_keep: int = 0, *,
                input_ids=None, attention_mask=None, past_key_values=None, use_cache=None,
                return_dict=None, **kwargs):
        """``model(idx, targets, caches)`` -> ``(logits, loss)``. With ``caches`` (one
        ``LayerCache`` per layer, see ``new_caches``) the tokens continue the cached sequence.
        ``logits_to_keep=n`` computes logits for the last n positions only (decoding).
        The pair is an ``LMOutput``: ``model(idx).logits`` works as well.

        Called the transformers way (``input_ids=``, ``past_key_values=``, ``use_cache=``,
        ``attention_mask=``, ``return_dict=``, as ``generate()`` does) it returns a
        ``CausalLMOutputWithPast`` instead; see ``generation.hf_forward``."""
        hf_args = (input_ids, attention_mask, past_key_values, use_cache, return_dict)
        if idx is None or kwargs or any(a is not None for a in hf_args):
            return hf_forward(self, idx if idx is not None else input_ids, attention_mask, past_key_values,
                              use_cache, return_dict, logits_to_keep, **kwargs)
        B, T = idx.shape
        start = caches[0].length if caches is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size="
                             f"{self.config.block_size}; load the model with a larger block_size "
                             "to evaluate beyond the training context")
        x = self.transformer.wte(idx)
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches is not None else None)
        if logits_to_keep:
            if targets is not None:
                raise ValueError("logits_to_keep and targets cannot be combined (the loss needs every logit)")
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.transformer.ln_f(x)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return LMOutput(logits, loss)

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """transformers' ``save_pretrained`` (config.json with ``auto_map``, generation_config.json,
        model.safetensors), plus what lets the folder open without this repository: the modelling
        code as remote code and the GPT-2 tokenizer (``hf_checkpoint.complete_folder``).
        ``push_to_hub=True`` (with ``repo_id=``) then uploads the complete folder (``push_to_hub``)."""
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private", "token",
                                                 "revision") if k in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        # Loaded as remote code (a package in transformers' module cache), transformers has just
        # copied these files itself; from the repository, hf_checkpoint writes them. It is
        # imported by name so that it is not itself shipped as remote code.
        if not __package__ and kwargs.get("is_main_process", True):
            importlib.import_module("hf_checkpoint").complete_folder(self, save_directory)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.push_to_hub(repo_id, **hub_kwargs)

    @classmethod
    def load(cls, path: str, map_location="cpu", **overrides) -> "GPT":
        """Load a ``save_pretrained`` folder or a training checkpoint file (``ckpt.pt`` with
        keys ``model`` and ``model_config``). ``overrides`` change config fields that do not
        change the parameters, e.g. ``block_size`` to evaluate beyond the training context."""
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
            return cls.from_pretrained(path, **overrides)
        if os.path.isdir(path):
            path = os.path.join(path, "ckpt.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint at {path} (expected a save_pretrained folder or ckpt.pt)")
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
        if "model" not in ckpt or "model_config" not in ckpt:
            raise ValueError(f"{path} is not a training checkpoint of this repository (needs 'model' and 'model_config')")
        config = GPTConfig(**{**ckpt["model_config"], **overrides})
        model = cls(config)
        state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]   # tied to the embedding
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model

    def new_caches(self) -> list[LayerCache]:
        return [LayerCache() for _ in range(self.config.n_layer)]

    @torch.no_grad()
    def generate(self, idx: Optional[Tensor] = None, max_new_tokens: Optional[int] = None,
                 temperature: float = 1.0, top_k: Optional[int] = None, **hf_kwargs):
        """nanoGPT: ``generate(idx, max_new_tokens, temperature=1.0, top_k=None)`` samples
        ``max_new_tokens`` tokens after the prompts ``idx`` (B, T) (equal lengths), prefilling
        once and then decoding from the KV cache; ``temperature=0`` is greedy.
        Raises ValueError when prompt + new tokens would exceed ``block_size``: the cache
        cannot slide, because several encodings carry absolute or cumulative state.

        Any other argument (``input_ids=``, ``do_sample=``, ``num_beams=``, ``attention_mask=``,
        ``generation_config=``...) calls transformers' ``GenerationMixin.generate`` instead
        (greedy, sampling and beam search; not assisted decoding)."""
        if hf_kwargs or idx is None or max_new_tokens is None:
            if max_new_tokens is not None:
                hf_kwargs["max_new_tokens"] = max_new_tokens
            if temperature != 1.0:
                hf_kwargs["temperature"] = temperature
            if top_k is not None:
                hf_kwargs["top_k"] = top_k
            return StreamingGenerationMixin.generate(self, idx, **hf_kwargs)
        return sample(self, idx, max_new_tokens, temperature, top_k)

    # -- training helpers ------------------------------------------------------------
    def num_parameters_unique(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def optimizer_groups(self, weight_decay: float):
        """Weight decay on matrices (dim >= 2), none on norm weights, biases and frequencies."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]
