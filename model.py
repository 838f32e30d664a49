"""One LLaMA-style decoder whose attention takes its positional encoding from ``grape.py``.

Pre-norm blocks, no biases, RMSNorm, optional QK-RMSNorm, SwiGLU MLP, tied embeddings,
optional KV-shift. ``GPT.forward(idx, targets)`` returns ``(logits, loss)`` like nanoGPT;
the classes are ``transformers`` config/model classes so ``save_pretrained`` /
``from_pretrained`` work on the checkpoints, and a saved folder carries this code as remote
code (``modeling/shipping.py``), so ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` opens it without this repository.
"""

import math
import os
import re
from typing import NamedTuple, Optional, Union

import transformers

from modeling.shipping import MIN_TRANSFORMERS, complete_folder


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


# Checked before anything else, so that an older release says so in one line.
if _release(transformers.__version__) < _release(MIN_TRANSFORMERS):
    raise ImportError(f"this GRAPE checkpoint needs transformers >= {MIN_TRANSFORMERS}, but "
                      f"{transformers.__version__} is installed: pip install -U 'transformers>={MIN_TRANSFORMERS}'")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from huggingface_hub.dataclasses import strict  # noqa: E402
from torch import Tensor  # noqa: E402
from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402

from grape import GRID_ENCODINGS, build_encoding, check_encoding_name  # noqa: E402
from modeling.attention import attend, backend_choices  # noqa: E402
from modeling.cache import LayerCache  # noqa: E402
from modeling.generation import StreamingGenerationMixin, check_length, cpu_threads, sample, threads_for  # noqa: E402
from modeling.hf_forward import base_forward, causal_lm_forward, read_weights  # noqa: E402
from modeling.padding import Layout  # noqa: E402

ROTARY_ENCODINGS = ("rope", "grape_m", "grape_m_ctx", "grape_m_basis", "grape_m_planes", "grape_m_grid",
                    "grape_m_ctx_dict")


def _modules_shipped_beside_this_file():
    """Never called. Releases of transformers before 5.10.1 copy a local folder's remote code
    into their module cache as the files model.py imports itself, not the files those import;
    naming every shipped module here brings them all along (5.4 to 5.10 then run the folder,
    older releases reach the version check above and say what they need)."""
    from modeling.bias import Bias  # noqa: F401
    from modeling.chunked import chunked_attention  # noqa: F401
    from modeling.dense import dense_attention  # noqa: F401
    from modeling.flex import flex_attention  # noqa: F401
    from modeling.grape_ap_cpu import grape_ap_cpu_attention  # noqa: F401
    from modeling.grape_ap_triton import grape_ap_triton_attention  # noqa: F401


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
# and the modules it imports (modeling/shipping.write_code).
AUTO_MAP = {"AutoConfig": f"{__name__.split('.')[-1]}.GPTConfig",
            "AutoModel": f"{__name__.split('.')[-1]}.GPTModel",
            "AutoModelForCausalLM": f"{__name__.split('.')[-1]}.GPT"}

# transformers' attn_implementation names -> this model's attention backends. "sdpa" (what
# transformers picks by default) keeps config.attn_backend: SDPA where there is no bias, the
# linear-memory paths where there is one.
ATTN_IMPLEMENTATIONS = {"eager": "dense", "flex_attention": "flex"}


def attention_backend(config) -> str:
    """The backend config.attn_backend names, unless attn_implementation asked for another."""
    requested = getattr(config, "_attn_implementation", None)
    return ATTN_IMPLEMENTATIONS.get(requested, config.attn_backend) if isinstance(requested, str) else config.attn_backend


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
    grape_log_freq_scale: float = 16.0        # GRAPE-M: parameter = this × log θ (slows its learning rate)
    grape_learnable_freq: bool = True         # GRAPE-M, GRAPE-M-ctx: learn the frequencies
    grape_m_per_head: bool = False            # GRAPE-M, GRAPE-M-ctx: one spectrum per head instead of shared
    grape_ctx_per_head: bool = False          # GRAPE-M-ctx, grape_a_phase: one phase increment per head
    grape_ctx_init_omega: float = 1e-3        # GRAPE-M-ctx: gate bias = softplus⁻¹(this)
    grape_ctx_omega_scale: float = 16.0       # GRAPE-M-ctx: ω = sigmoid(gate / this)
    grape_basis_shared: bool = False          # grape_m_basis: one basis E for all heads (Algorithm 1)
    grape_planes_depth: int = 1               # grape_m_planes/grid: butterfly passes of the plane frame
    grape_ctx_dict_size: int = 4              # grape_m_ctx_dict: phase channels (frequency bands)
    grape_a_dict_size: int = 4                # grape_a_dict: gated additive atoms per head
    grid: Optional[Union[tuple[int, ...], list[int]]] = None   # grid encodings: (H, W) or (T, H, W), raster order
    grid_distance: str = "abs"                # grape_a_grid: abs | signed | radial
    grape_nc_planes: int = 4                  # non-commuting GRAPE-M: rank-2 generators per head
    # GRAPE-A, in the original's names: ω_init (None = 1) and the gate vectors' init std
    # (None = 1/√head_dim), L2 normalisation and its eps; "k" reads keygated_*, "q" querygated_*,
    # "qk" querykeygated_omega_init with keygated_u_* and querygated_v_*
    keygated_omega_init: Optional[float] = None
    querygated_omega_init: Optional[float] = None
    querykeygated_omega_init: Optional[float] = None
    keygated_u_init_std: Optional[float] = None
    keygated_u_l2_norm: bool = True
    keygated_u_l2_eps: float = 1e-6
    querygated_v_init_std: Optional[float] = None
    querygated_v_l2_norm: bool = True
    querygated_v_l2_eps: float = 1e-6
    p_head_dim: Optional[int] = 8             # GRAPE-AP probe width (None = head_dim)
    p_tie_mode: str = "none"                  # GRAPE-AP: none | pq | pk | pv
    use_qk_rmsnorm: bool = True
    qk_norm_after_rotation: bool = False      # the original's order in its rotary files (breaks the exact relative law)
    using_groupnorm: bool = False             # RMSNorm per head on the attention output
    use_k_shift: bool = False
    use_v_shift: bool = False
    norm_eps: float = 1e-5
    attn_backend: str = "auto"
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.grid is not None:
            self.grid = tuple(self.grid)       # a list after a JSON round trip
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
        if "grape_ap" in parts and self.p_tie_mode == "none" and (self.p_head_dim or self.head_dim) % 2:
            raise ValueError(f"p_head_dim={self.p_head_dim} must be even (GRAPE-AP probes rotate in planes)")
        for key in ("keygated_omega_init", "querygated_omega_init", "querykeygated_omega_init"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be non-negative (ω_h = softplus(ω̂_h) ≥ 0)")
        for key in ("grape_log_freq_scale", "grape_ctx_omega_scale", "keygated_u_l2_eps", "querygated_v_l2_eps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "head_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.attn_backend not in backend_choices():
            raise ValueError(f"unknown attn_backend {self.attn_backend!r}; choose one of {backend_choices()}")
        self.check_grid(parts)

    def check_grid(self, parts) -> None:
        on_grid = [p for p in parts if p in GRID_ENCODINGS]
        if on_grid and self.grid is None:
            raise ValueError(f"pos_encoding {self.pos_encoding!r} places tokens on a grid: set grid=(H, W) "
                             "or (T, H, W) (tokens in raster order)")
        if self.grid is None:
            return
        if not on_grid:
            raise ValueError(f"grid={self.grid} is used only by the grid encodings {GRID_ENCODINGS}, "
                             f"not by pos_encoding {self.pos_encoding!r}")
        if not self.grid or any(s < 1 for s in self.grid):
            raise ValueError(f"grid sizes must be positive, got {self.grid}")
        if self.block_size > math.prod(self.grid):
            raise ValueError(f"grid={self.grid} holds {math.prod(self.grid)} tokens, fewer than "
                             f"block_size={self.block_size}")
        if self.grid_distance not in ("abs", "signed", "radial"):
            raise ValueError(f"grid_distance must be abs, signed or radial, got {self.grid_distance!r}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class TokenShift(nn.Module):
    """KV-shift: y_t = a_t y_{t-1} + (1 - a_t) y_t, a_t = sigmoid(w_h·x_t) per head, y_{-1} = 0."""

    def __init__(self, config, name: str):
        super().__init__()
        self.name = name
        self.gate = nn.Linear(config.n_embd, config.n_head, bias=False)

    def forward(self, x: Tensor, y: Tensor, cache: Optional[LayerCache], real: Optional[Tensor] = None) -> Tensor:
        # y: (B, H, T, D) projections of this chunk; the cache holds the previous chunk's last one.
        # In a padded batch (real: (B, T)) a pad is nobody's previous token: it counts as 0.
        source = y if real is None else y.masked_fill(~real[:, None, :, None], 0.0)
        prev_last = cache.get(self.name) if cache is not None else None
        if prev_last is None:
            prev_last = torch.zeros_like(y[:, :, :1])
        prev = torch.cat([prev_last, source[:, :, :-1]], dim=2)
        if cache is not None:
            cache.set(self.name, source[:, :, -1:])
        a = torch.sigmoid(self.gate(x).float()).transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1), float32
        return (a * prev + (1 - a) * y).to(y.dtype)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.config = config                   # the backend may change with attn_implementation
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
        self.norm_after_rotation = config.qk_norm_after_rotation
        if self.norm_after_rotation and self.pos.additive:
            raise ValueError(f"qk_norm_after_rotation applies to rotary encodings only; {config.pos_encoding!r} "
                             "has an additive part whose gates must see normalised q, k")

    def heads(self, y: Tensor) -> Tensor:
        B, T, _ = y.shape
        return y.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    @property
    def backend(self) -> str:
        return attention_backend(self.config)

    def project(self, x: Tensor, cache: Optional[LayerCache] = None, layout: Optional[Layout] = None):
        """q, k, v per head after KV-shift and QK-norm (unless it comes after the rotation),
        before the positional encoding."""
        q, k, v = self.heads(self.c_q(x)), self.heads(self.c_k(x)), self.heads(self.c_v(x))
        real = layout.real if layout is not None else None
        if self.k_shift is not None:
            k = self.k_shift(x, k, cache, real)
        if self.v_shift is not None:
            v = self.v_shift(x, v, cache, real)
        if self.norm_after_rotation:
            return q, k, v
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None, coords: Optional[Tensor] = None,
                layout: Optional[Layout] = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.project(x, cache, layout)
        offset = cache.length if cache is not None else 0
        extra = {} if coords is None else {"coords": coords}      # grid encodings: explicit positions
        if layout is not None:
            extra["layout"] = layout                              # a padded batch (padding.py)
        q, k, bias = self.pos(x, q, k, v=v, offset=offset, cache=cache, **extra)
        if self.norm_after_rotation:           # the original's order in its RoPE/GRAPE-M files
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            k, v = cache.extend("k", k), cache.extend("v", v)
            cache.length += T
        y = attend(q, k, v, bias, self.backend, layout.key_padding if layout is not None else None)
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

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None, coords: Optional[Tensor] = None,
                layout: Optional[Layout] = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, coords, layout)
        return x + self.mlp(self.ln_2(x))


class LMOutput(NamedTuple):
    """``logits, loss = model(idx, targets)`` as in nanoGPT, and ``model(idx).logits`` as tools
    written for transformers models read it (lm_eval's hf model)."""
    logits: Tensor
    loss: Optional[Tensor]


class GPTPreTrainedModel(PreTrainedModel):
    """What the base transformer and the language model share as transformers models."""
    config_class = GPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"     # what transformers' generate() looks for
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True             # attn_implementation: sdpa, eager, flex_attention (ATTN_IMPLEMENTATIONS)
    _supports_flex_attn = True

    def _init_weights(self, module):
        # All initialisation happens in reset_parameters; transformers must not redo it.
        pass

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True                   # Attention reads it from the config at every call

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``, made safe and strict. A local folder's weight files
        are checked first: an index may name only files inside the folder, and a
        ``pytorch_model.bin`` must load without unpickling code (``hf_forward.check_weight_files``).
        transformers leaves a parameter the checkpoint lacks uninitialised and ignores one it has
        too many; here a local folder whose parameters do not match is read again through
        ``load_state_dict``, which converts the earlier parameterisations of this repository
        (GRAPE-M's δ, GRAPE-M-ctx's fixed spectrum; see grape.py), and any mismatch left is an
        error naming the parameters."""
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            read_weights(path, check_only=True)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = set(info["missing_keys"]) - {"lm_head.weight"}             # tied to the embedding
        if missing or info["unexpected_keys"] or info["mismatched_keys"]:
            if not os.path.isdir(path):
                raise ValueError(f"{path} does not match its config: missing {sorted(missing)[:5]}, "
                                 f"unexpected {sorted(info['unexpected_keys'])[:5]}")
            model.load_exactly(read_weights(path), path)
        return (model, info) if want_info else model

    def load_exactly(self, state: dict, source: str) -> None:
        """load_state_dict (its conversion hooks run), then an error for any parameter left unmatched."""
        prefix = self.base_model_prefix + "."
        if not hasattr(self, "lm_head"):          # the base transformer reads a language model's weights
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()
                     if k != "lm_head.weight"}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]   # tied to the embedding
        if missing or unexpected:
            raise ValueError(f"checkpoint {source} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


class GPTModel(GPTPreTrainedModel):
    """The transformer without its language-model head (what ``AutoModel`` opens): token
    embedding, blocks, final RMSNorm. ``forward`` returns the final hidden states (B, T, C)."""

    def __init__(self, config: GPTConfig, initialise: bool = True):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = RMSNorm(config.n_embd, config.norm_eps)
        # activation checkpointing (transformers' gradient/activation_checkpointing_enable, or the
        # training option --activation_checkpointing=True): blocks recompute their forward in backward
        self.gradient_checkpointing = False
        if initialise:                   # GPT initialises after adding its head (the same random draws)
            self.reset_parameters()
        self.post_init()

    def reset_parameters(self) -> None:
        """Embedding N(0, 0.02); matrices N(0, 0.5/√C); residual outputs also / √n_layer.
        Encodings keep the init they chose themselves."""
        C, L = self.config.n_embd, self.config.n_layer
        std = 0.5 / math.sqrt(C)
        nn.init.normal_(self.wte.weight, std=0.02)
        for block in self.h:
            for name, module in block.named_modules():
                if name.startswith("attn.pos"):
                    continue
                if isinstance(module, nn.Linear):
                    residual_out = name in ("attn.c_proj", "mlp.c_proj")
                    nn.init.normal_(module.weight, std=std / math.sqrt(L) if residual_out else std)
                elif isinstance(module, RMSNorm):
                    nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def run(self, idx: Tensor, caches: Optional[list[LayerCache]] = None, coords: Optional[Tensor] = None,
            layout: Optional[Layout] = None, hidden_states: Optional[list] = None) -> Tensor:
        """The final hidden states, normalised, (B, T, C). ``hidden_states``: a list that receives
        the embedding output and every block's output (the last one normalised, transformers' way)."""
        x = self.wte(idx)
        for i, block in enumerate(self.h):
            if hidden_states is not None:
                hidden_states.append(x)
            cache = caches[i] if caches is not None else None
            if self.gradient_checkpointing and self.training and cache is None:
                x = self.checkpoint_function()(block.__call__, x, None, coords, layout)
            else:
                x = block(x, cache, coords, layout)
        x = self.ln_f(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

    def checkpoint_function(self):
        """transformers' (set by gradient_checkpointing_enable), else torch's non-reentrant one."""
        function = getattr(self, "_gradient_checkpointing_func", None)
        if function is None:
            from functools import partial
            from torch.utils.checkpoint import checkpoint
            function = partial(checkpoint, use_reentrant=False)
        return function

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values=None, cache=None,
                use_cache: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, coords: Optional[Tensor] = None, **kwargs):
        """transformers' base-model call -> ``BaseModelOutputWithPast`` (``hf_forward.base_forward``)."""
        return base_forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, cache=cache, use_cache=use_cache,
                            output_hidden_states=output_hidden_states, return_dict=return_dict, coords=coords,
                            **kwargs)

    def new_caches(self) -> list[LayerCache]:
        return [LayerCache() for _ in range(self.config.n_layer)]


class GPT(GPTPreTrainedModel, StreamingGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.transformer = GPTModel(config, initialise=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.reset_parameters()
        self.post_init()

    def reset_parameters(self) -> None:
        self.transformer.reset_parameters()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def set_activation_checkpointing(self, on: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them (the training
        option --activation_checkpointing; training/sizing.py accounts for it)."""
        self.transformer.gradient_checkpointing = on

    # -- forward ----------------------------------------------------------------------
    def forward(self, idx: Optional[Tensor] = None, targets: Optional[Tensor] = None,
                caches: Optional[list[LayerCache]] = None, logits_to_keep: int = 0, *,
                coords: Optional[Tensor] = None, input_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, past_key_values=None, cache=None, use_cache: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs):
        """``model(idx, targets, caches)`` -> ``(logits, loss)``. With ``caches`` (one
        ``LayerCache`` per layer, see ``new_caches``) the tokens continue the cached sequence.
        ``logits_to_keep=n`` computes logits for the last n positions only (decoding).
        ``coords`` (T, axes) or (B, T, axes): explicit token coordinates for the grid encodings
        (default: raster order on ``config.grid``).
        The pair is an ``LMOutput``: ``model(idx).logits`` works as well.

        Called the transformers way (``input_ids=``, ``attention_mask=``, ``labels=``, a cache as
        ``past_key_values=`` or ``cache=``, ...; as ``generate()``, ``Trainer`` and PEFT call it) it
        returns a ``CausalLMOutputWithPast`` instead; see ``hf_forward.causal_lm_forward``."""
        hf = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                  past_key_values=past_key_values, cache=cache, use_cache=use_cache,
                  output_hidden_states=output_hidden_states, return_dict=return_dict)
        if idx is None or kwargs or any(v is not None for v in hf.values()):
            hf["input_ids"] = idx if idx is not None else input_ids
            return causal_lm_forward(self, logits_to_keep=logits_to_keep, coords=coords, **hf, **kwargs)
        B, T = idx.shape
        start = caches[0].length if caches is not None else 0
        check_length(self.config, start + T)
        if coords is not None and self.config.grid is None:
            raise ValueError("coords are token coordinates for the grid encodings; this model has no grid")
        x = self.transformer.run(idx, caches, coords)
        if logits_to_keep:
            if targets is not None:
                raise ValueError("logits_to_keep and targets cannot be combined (the loss needs every logit)")
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return LMOutput(logits, loss)

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, run_facts: Optional[dict] = None,
                        **kwargs):
        """transformers' ``save_pretrained`` (config.json with ``auto_map``, generation_config.json,
        model.safetensors), plus what lets the folder open without this repository: the modelling
        code as remote code, the GPT-2 tokenizer and a model card (``shipping.complete_folder``;
        ``run_facts``: what the training knows, e.g. tokens seen and validation loss).
        ``push_to_hub=True`` (with ``repo_id=``) then uploads the complete folder (``push_to_hub``)."""
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private", "token",
                                                 "revision") if k in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            complete_folder(self, save_directory, run_facts)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.push_to_hub(repo_id, **hub_kwargs)

    def push_to_hub(self, repo_id: str, *, commit_message: Optional[str] = None, private: Optional[bool] = None,
                    token=None, revision: Optional[str] = None, create_pr: bool = False, **save_kwargs):
        """Upload the complete folder ``save_pretrained`` writes (weights, config, code, tokenizer,
        model card) as one commit. transformers' own ``push_to_hub`` would replace the folder's
        card with a generic one; this uploads the folder as written (huggingface_hub's API)."""
        import tempfile
        from huggingface_hub import CommitOperationAdd, HfApi
        for key in ("tags", "commit_description", "use_temp_dir", "safe_serialization"):
            save_kwargs.pop(key, None)         # transformers' push_to_hub options with no effect here
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
                          for name in files]
            return api.create_commit(repo_id=repo_id, operations=operations, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or "Upload GRAPE checkpoint")

    def new_caches(self) -> list[LayerCache]:
        return self.transformer.new_caches()

    @torch.no_grad()
    def generate(self, idx: Optional[Tensor] = None, max_new_tokens: Optional[int] = None,
                 temperature: float = 1.0, top_k: Optional[int] = None, threads: Optional[int] = None,
                 **hf_kwargs):
        """nanoGPT: ``generate(idx, max_new_tokens, temperature=1.0, top_k=None)`` samples
        ``max_new_tokens`` tokens after the prompts ``idx`` (B, T) (equal lengths), prefilling
        once and then decoding from the KV cache; ``temperature=0`` is greedy.
        Raises ValueError when prompt + new tokens would exceed ``block_size``: the cache
        cannot slide, because several encodings carry absolute or cumulative state.
        ``threads``: CPU threads while decoding (None or 0: ``generation.decoding_threads``,
        1 for small models); the caller's thread count is restored afterwards.

        Any other argument (``input_ids=``, ``do_sample=``, ``num_beams=``, ``attention_mask=``,
        ``generation_config=``...) calls transformers' ``GenerationMixin.generate`` instead
        (greedy, sampling and beam search, padded batches; not assisted decoding), after the
        same check of the length."""
        prompt = idx if idx is not None else hf_kwargs.get("input_ids")
        n_threads = threads_for(self, prompt, threads) if prompt is not None else None
        with cpu_threads(n_threads):
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

    def flops_per_token(self) -> float:
        """Training FLOPs per token, nanoGPT's estimate (PaLM appendix B): 6N for the matmuls
        (forward and backward) + 12·L·H·D·T for the attention logits and values. The training
        log's MFU and the dry run (``training/sizing.py``) use it; positional encodings add
        lower-order terms it leaves out."""
        c = self.config
        return 6 * self.num_parameters_unique() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    WEIGHT_DECAY_POLICIES = ("all_but_norms", "matrices")

    def optimizer_groups(self, weight_decay: float, policy: str = "all_but_norms"):
        """AdamW parameter groups: ``[decayed, not decayed]``.

        ``all_but_norms`` (default, the original repository's): weight decay on every
        parameter except RMSNorm weights, so also on frequencies, ω, gate vectors and biases
        (decay pulls GRAPE-M's s·log θ toward 0, i.e. θ toward 1, as in the paper's runs).
        ``matrices``: weight decay on every parameter with at least two dimensions (weight
        matrices, and also per-head frequency tables, GRAPE-A gate vectors, GRAPE-M bases,
        non-commuting planes), none on one-dimensional ones (norm weights, biases, shared
        frequencies, ω). Frozen parameters are left out."""
        if policy not in self.WEIGHT_DECAY_POLICIES:
            raise ValueError(f"weight decay policy must be one of {self.WEIGHT_DECAY_POLICIES}, got {policy!r}")
        norm_weights = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        params = [p for p in self.parameters() if p.requires_grad]
        if policy == "all_but_norms":
            decayed = [id(p) not in norm_weights for p in params]
        else:
            decayed = [p.dim() >= 2 for p in params]
        return [{"params": [p for p, d in zip(params, decayed) if d], "weight_decay": weight_decay},
                {"params": [p for p, d in zip(params, decayed) if not d], "weight_decay": 0.0}]
