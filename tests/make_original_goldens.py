"""Golden files from the original GRAPE implementation (github.com/model-architectures/GRAPE),
read by tests/test_original_parity.py and tests/test_config.py.

Run by hand from the repository root against a checkout of the original:

    python tests/make_original_goldens.py /path/to/GRAPE --fox-src /path/to/forgetting-transformer/src

``--fox-src`` is the ``src`` folder of github.com/zhixuan-lin/forgetting-transformer, whose
``forgetting_attention`` kernel the original's model/fox.py imports (needs ``einops``).

It writes, under tests/golden/original/:
- ``<case>.pt`` for every original model type with and without KV-shift (and a few variants):
  the original's config, a recipe for every parameter (all perturbed, norm weights included:
  base + scale · a hash of the name, see tests/original_goldens.py), inputs, the logits and
  loss, the gradients, the parameters after one AdamW step with the original's parameter
  groups (optim_utils.get_optimizer_param_groups), betas, eps and weight decay and gradient
  clipping (train_adam_finewebedu.py), the names of the decayed parameters, and the original's
  initial values of its deterministically initialised parameters;
- ``configs.json``: every config/*.py of the original resolved the way its training script
  resolves it (defaults, configurator.py, then seeds), and the model_args it passes to GPTConfig;
- ``checkpoints/<model_type>/``: two tiny save_pretrained folders as the original writes them
  (config.json + pytorch_model.bin) with the logits the original computes from them.

Running the original on CPU with this repository's packages (torch 2.13, transformers 5, triton 3;
the original pinned torch 2.4 and transformers 4) needs, here only:
- KV-shift: model/kv_shift.py's Triton kernel refuses CPU tensors; the original's own torch
  reference, model/kv_shift_torch.token_shift_torch, is patched in;
- FoX: forgetting_attention and fox.py's token-shift kernel are Triton; they run under
  TRITON_INTERPRET=1 (set before triton is imported). The attention kernel accepts only
  fp16/bf16 inputs in its wrapper, so its autograd Function is called directly with float32;
  the CUDA queries it makes (device_of, device, get_device_capability) are answered as on an
  A100, whose block sizes it then uses;
- save_pretrained: transformers 5 always writes safetensors, so the checkpoint folders are
  written as transformers 4 did for the original's ``safe_serialization=False``: the config's
  save_pretrained, then torch.save of the state dict as pytorch_model.bin.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import json
import math
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"          # before anything imports triton

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from original_goldens import GOLDEN_DIR, perturbed, sample, uniform  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=32, head_dim=16, vocab_size=16, block_size=64)
BATCH, LENGTH = 2, 48
ADAMW = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, grad_clip=1.0)

MODEL_TYPES = ["llama-mha-rope", "llama-mha-alibi", "llama-mha-fox", "llama-mha-grape-m-nonctx",
               "llama-mha-grape-m-ctx", "llama-mha-grape-a-querygated", "llama-mha-grape-a-keygated",
               "llama-mha-grape-a-querykeygated", "llama-mha-grape-ap-v1"]
VARIANTS = {   # case name -> (model_type, KV-shift, original config keys)
    "grape-m-nonctx-per-head": ("llama-mha-grape-m-nonctx", False, dict(grape_share_across_heads=False)),
    "grape-m-nonctx-frozen": ("llama-mha-grape-m-nonctx", False, dict(grape_learnable_freq=False)),
    "grape-m-ctx-per-head": ("llama-mha-grape-m-ctx", True, dict(grape_ctx_per_head=True,
                                                                 grape_share_across_heads=False)),
    "grape-a-querykeygated-knobs": ("llama-mha-grape-a-querykeygated", False,
                                    dict(querykeygated_omega_init=0.5, keygated_u_l2_norm=False)),
    "grape-ap-v1-pq-tie": ("llama-mha-grape-ap-v1", False, dict(p_tie_mode="pqtie")),
    "grape-ap-v1-pv-tie-groupnorm": ("llama-mha-grape-ap-v1", True, dict(p_tie_mode="pvtie", using_groupnorm=True)),
    "fox-groupnorm": ("llama-mha-fox", False, dict(using_groupnorm=True)),
}
CHECKPOINTS = {"llama-mha-rope": False, "llama-mha-grape-m-ctx": True}   # model_type -> KV-shift


# -- running the original on CPU ------------------------------------------------------------

def import_original(root: str, fox_src: str):
    sys.path.insert(0, fox_src)
    sys.path.insert(0, root)
    # forgetting_attention asks CUDA for its device and block configuration: answer as an A100
    torch.cuda.device_of = lambda tensor: None
    torch.cuda.device = lambda device: contextlib.nullcontext()
    torch.cuda.get_device_capability = lambda *args: (8, 0)
    import forgetting_transformer.ops.forgetting_attention as fa
    kv_shift = importlib.import_module("model.kv_shift")
    kv_shift_torch = importlib.import_module("model.kv_shift_torch")
    kv_shift.token_shift = kv_shift_torch.token_shift_torch           # CUDA-only kernel -> its torch reference
    fox = importlib.import_module("model.fox")

    def forgetting_attention(q, k, v, log_fgate, *, head_first=False, seq_start=None, sm_scale=None,
                             adaptive_threshold=None):
        assert head_first and seq_start is None and adaptive_threshold is None
        return fa.ForgettingAttention.apply(q, k, v, log_fgate, None, True, sm_scale, None,
                                            False, False, None, False, False)
    fox.forgetting_attention = forgetting_attention                   # float32 allowed
    return {t: importlib.import_module(f"model.{t}") for t in MODEL_TYPES}


def original_config(module, kv: bool, extra: dict, **sizes):
    return module.GPTConfig(**{**TINY, **sizes}, bias=False, dropout=0.0, use_k_shift=kv, use_v_shift=kv,
                            **extra)


# -- parameters: what each is set to ------------------------------------------------------------

NORM_MARKERS = ("ln_1.", "ln_2.", "ln_f.", "_rms.", "subln.", "q_norm.", "k_norm.", "output_norm.")


def recipe(name: str, param: torch.Tensor, n_embd: int):
    """(base, scale): every parameter moved well away from its init, each kind in a range where
    it matters (norm weights around 1, frequencies around RoPE's, gates across their range)."""
    if any(m in name for m in NORM_MARKERS):
        return 1.0, 0.3
    if name.endswith("grape.log_freq"):        # around the initial spectrum: 16·log θ (nonctx) or log θ
        return param.detach().clone(), 8.0 if param.abs().max() > 20 else 0.5
    if name.endswith("omega_proj.weight"):
        return 0.0, 8.0 / math.sqrt(n_embd)           # ω = sigmoid(z/16) must vary
    if name.endswith("omega_proj.bias"):
        return -3.0, 4.0
    if name.endswith("_bias.omega"):
        return 0.5, 1.0
    if name.endswith(("_bias.u", "_bias.v")):
        return 0.0, 1.0
    if name.endswith("fgate_proj.bias"):
        return 2.0, 2.0
    if name.endswith("transformer.wte.weight"):
        return 0.0, 0.5
    if param.dim() >= 2:
        return 0.0, 1.7 / math.sqrt(param.shape[1])
    raise ValueError(f"no recipe for {name} {tuple(param.shape)}")


def deterministic_init(name: str) -> bool:
    """Parameters whose original initial value does not come from the RNG."""
    return (any(m in name for m in NORM_MARKERS) or name.endswith(("grape.log_freq", "_bias.omega",
            "omega_proj.weight", "omega_proj.bias", "fgate_proj.bias")))


def tokens(name: str, shape) -> torch.Tensor:
    return ((torch.from_numpy(uniform(name, math.prod(shape))) + 1) / 2 * TINY["vocab_size"]).long().view(shape)


def set_parameters(model, n_embd: int) -> tuple[list, dict]:
    """Set every parameter from its recipe; returns [(name, shape, base, scale)] and the
    initial values of the deterministically initialised ones."""
    recipes, init = [], {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if deterministic_init(name):
                init[name] = p.detach().clone()
            base, scale = recipe(name, p, n_embd)
            recipes.append((name, tuple(p.shape), base, scale))
            p.copy_(perturbed(name, p.shape, base, scale))
    return recipes, init


# -- one case ---------------------------------------------------------------------------------

def run_case(modules, optim_utils, name: str, model_type: str, kv: bool, extra: dict) -> dict:
    module = modules[model_type]
    config = original_config(module, kv, extra)
    torch.manual_seed(0)
    model = module.GPT(config)
    recipes, init = set_parameters(model, config.n_embd)
    idx = tokens(f"{name}/idx", (BATCH, LENGTH))
    targets = tokens(f"{name}/targets", (BATCH, LENGTH))
    logits, loss = model(idx, targets)
    loss.backward()
    names = {id(p): n for n, p in model.named_parameters()}
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    grads = torch.cat([sample(p.grad) for _, p in model.named_parameters() if p.grad is not None])
    torch.nn.utils.clip_grad_norm_(model.parameters(), ADAMW["grad_clip"])
    groups = optim_utils.get_optimizer_param_groups(model, ADAMW["weight_decay"])
    optimizer = torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"])
    optimizer.step()
    decayed = sorted(names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"])
    return {
        "model_type": model_type, "kv_shift": kv, "original_config": config.to_dict(),
        "recipes": recipes, "idx": idx, "targets": targets,
        "logits": logits.detach().float(), "loss": loss.item(),
        # sampled entries (original_goldens.sample), concatenated in recipe order
        "grad_names": with_grad, "grads": grads,
        "stepped": torch.cat([sample(p) for _, p in model.named_parameters()]),
        "decayed": decayed, "adamw": ADAMW, "init": init,
    }


def cases():
    for model_type in MODEL_TYPES:
        for kv in (False, True):
            yield model_type.removeprefix("llama-mha-") + ("-kvshift" if kv else ""), model_type, kv, {}
    for name, (model_type, kv, extra) in VARIANTS.items():
        yield name, model_type, kv, extra


def write_checkpoints(modules, out: str) -> None:
    """Tiny folders as the original's training script writes them, and the logits it computes."""
    for model_type, kv in CHECKPOINTS.items():
        module = modules[model_type]
        config = original_config(module, kv, {}, n_layer=1, n_embd=16, head_dim=8)
        torch.manual_seed(1)
        model = module.GPT(config)
        set_parameters(model, config.n_embd)
        folder = os.path.join(out, "checkpoints", model_type + ("-kvshift" if kv else ""))
        os.makedirs(folder, exist_ok=True)
        config.save_pretrained(folder)
        torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
        idx = tokens(f"{model_type}/checkpoint", (1, 24))
        with torch.no_grad():
            logits, _ = model(idx, output_all_seq=True)
        torch.save({"idx": idx, "logits": logits.float()}, os.path.join(folder, "expected_logits.pt"))


# -- configs ----------------------------------------------------------------------------------

def resolve_config(root: str, path: str) -> dict:
    """Run the original training script's configuration part on one config file: its defaults,
    configurator.py, the seed defaults, and the model_args it builds for GPTConfig."""
    source = open(os.path.join(root, "train_adam_finewebedu.py")).read()
    head = source[source.index("# default config values"):source.index("model_file = importlib.import_module")]
    args_start = source.index("model_args = {")
    args_part = source[args_start:source.index("if init_from == 'scratch':", args_start)]
    scope = {"os": os, "__name__": "__config__"}
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = ["train_adam_finewebedu.py", path]
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            exec(head, scope)
            exec(args_part, scope)
    finally:
        sys.argv = argv
        os.chdir(cwd)
    plain = (int, float, bool, str, type(None))
    file_scope: dict = {}
    exec(open(path).read(), file_scope)          # the names the file itself sets
    file_keys = [k for k, v in file_scope.items() if not k.startswith("_") and isinstance(v, plain)]
    values = {**scope["config"], **{k: scope[k] for k in file_keys}}
    return {"values": values, "model_args": scope["model_args"]}


OURS = """
import json, sys
sys.path.insert(0, "tests")
from training.configurator import configure
from original_goldens import with_fixed_keys
from training.settings import defaults
out = {}
for path in sys.argv[1:]:
    values, accepted = defaults()
    out[path] = with_fixed_keys(configure([path], values, accepted, verbose=False)[0])
print(json.dumps(out))
"""


def write_configs(root: str, out: str) -> None:
    """configs.json, after checking that this repository's configurator reads each of the
    original's files (unchanged) to the same values (in a subprocess: both have a 'model')."""
    import subprocess
    from original_goldens import config_mismatches
    paths = sorted(glob.glob(os.path.join(root, "config", "*.py")))
    configs = {os.path.basename(p): resolve_config(root, os.path.abspath(p)) for p in paths}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = json.loads(subprocess.run([sys.executable, "-c", OURS, *paths], cwd=repo, check=True,
                                     capture_output=True, text=True).stdout)
    problems = [f"{os.path.basename(p)}: {m}" for p in paths
                for m in config_mismatches(configs[os.path.basename(p)], ours[p])]
    if problems:
        raise SystemExit("this repository reads the original's config files differently:\n" + "\n".join(problems))
    with open(os.path.join(out, "configs.json"), "w") as f:
        json.dump(configs, f, indent=1, sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("original", help="checkout of the original GRAPE repository")
    parser.add_argument("--fox-src", required=True, help="the src folder of the forgetting-transformer repository")
    parser.add_argument("--out", default=GOLDEN_DIR)
    args = parser.parse_args()
    root = os.path.abspath(args.original)
    os.makedirs(args.out, exist_ok=True)
    write_configs(root, args.out)
    modules = import_original(root, os.path.abspath(args.fox_src))
    optim_utils = importlib.import_module("optim_utils")
    for name, model_type, kv, extra in cases():
        golden = run_case(modules, optim_utils, name, model_type, kv, extra)
        torch.save(golden, os.path.join(args.out, f"{name}.pt"))
        print(f"{name}: loss {golden['loss']:.4f}")
    write_checkpoints(modules, args.out)


if __name__ == "__main__":
    main()
