"""configurator.py and config/: strict keys and types, the original repository's files, the paper's runs."""
import glob
import json
import os
import sys

import pytest
import torch

from training.configurator import ConfigError, configure
from model import GPT, GPTConfig
from train_adam_finewebedu import main
from training.settings import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from original_goldens import config_mismatches, with_fixed_keys  # noqa: E402


def resolve(*argv):
    values, accepted = defaults()
    cfg, _ = configure(list(argv), values, accepted, verbose=False)
    return cfg


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_unknown_key_in_file_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'n_layers'"):
        resolve(write(tmp_path, "n_layers = 4\n"))


def test_unknown_key_on_command_line_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="'learning_rat'"):
        resolve("--learning_rat=1e-3")
    with pytest.raises(ConfigError, match="'learning_rat'"):   # the script stops before any work
        main(["--learning_rat=1e-3"])


@pytest.mark.parametrize("arg, key", [("--batch_size=abc", "batch_size"), ("--batch_size=2.5", "batch_size"),
                                      ("--compile=yes", "compile"), ("--n_layer=True", "n_layer"),
                                      ("--learning_rate=fast", "learning_rate")])
def test_wrong_type_on_command_line_is_an_error_naming_the_key(arg, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        resolve(arg)


def test_wrong_type_in_file_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'max_iters'"):
        resolve(write(tmp_path, "max_iters = '100'\n"))


def test_values_are_typed_and_later_overrides_win(tmp_path):
    cfg = resolve(write(tmp_path, "learning_rate = 1\nbatch_size = 4\nout_dir = 'a'\n"),
                  "--batch_size=7", "--out_dir=123", "--compile=false", "--head_dim=None")
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.batch_size == 7 and cfg.out_dir == "123" and cfg.compile is False and cfg.head_dim is None


def test_keys_set_by_a_shared_base_count_as_set_even_at_their_default(tmp_path):
    """A run file that execs a shared base: the base's keys are values of the run and count as
    set by the file (resume compares them with the checkpoint), also where they equal the default."""
    values, accepted = defaults()
    write(tmp_path, f"n_layer = {values['n_layer']}\nn_head = 3\nx = 1\ndel x\n", name="base.py")
    run = write(tmp_path, "import os\nexec(open(os.path.join(os.path.dirname(__file__), 'base.py')).read())\n"
                          "n_embd = 96\n", name="run.py")
    cfg, explicit = configure([run], values, accepted, verbose=False)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (values["n_layer"], 3, 96)
    assert {"n_layer", "n_head", "n_embd"} <= explicit
    assert "block_size" not in explicit and "os" not in explicit


def test_model_keys_are_gptconfig_fields_with_its_defaults():
    values, _ = defaults()
    for name in ("pos_encoding", "p_tie_mode", "use_k_shift", "rope_base", "attn_backend"):
        assert values[name] == getattr(GPTConfig, name)
    # the original training script's model defaults instead (its p_head_dim None means head_dim)
    assert (values["n_layer"], values["n_embd"], values["block_size"], values["p_head_dim"]) == (24, 1024, 4096, None)


def test_original_repository_config_runs_unchanged(tmp_path):
    # the style and key names of the original repository's kv-shift GRAPE-AP config
    text = """import time
import os
from datetime import datetime
wandb_log = False
wandb_project = 'nanogpt-next'
n_layer = 36
n_head = 10
n_embd = 1280
head_dim = 128
dropout = 0.0
bias = False
using_groupnorm = False
use_qk_rmsnorm = True
embedding_init_std = 0.02
hidden_init_std_factor = 0.5
p_tie_mode = 'pqtie'
p_head_dim = 8
use_k_shift = True
use_v_shift = True
seed = 42
batch_size = 15
block_size = 4096
gradient_accumulation_steps = 60 // batch_size
grape_base = 10000.0
keygated_omega_init = None
optimizer_name = 'adamw'
schedule = 'cosine'
compile = True
model_type = 'llama-mha-grape-ap-v1'
"""
    cfg = resolve(write(tmp_path, text))
    assert cfg.pos_encoding == "grape_ap" and cfg.use_k_shift and cfg.use_v_shift
    assert cfg.gradient_accumulation_steps == 4 and cfg.p_tie_mode == "pq" and cfg.seed == 42


def test_original_encoding_keys_reach_the_model_with_their_meaning(tmp_path):
    text = ("model_type = 'llama-mha-grape-m-ctx'\ngrape_base = 500.0\ngrape_share_across_heads = False\n"
            "grape_learnable_freq = False\ngrape_ctx_init_omega = 0.5\np_head_dim = None\n")
    cfg = resolve(write(tmp_path, text))
    from training.configurator import model_fields
    config = GPTConfig(**{k: cfg[k] for k in model_fields()} | dict(n_layer=1, n_head=2, n_embd=32, head_dim=16))
    enc = GPT(config).transformer.h[0].attn.pos
    assert enc.log_freq.shape == (2, 8) and not enc.log_freq.requires_grad
    assert enc.frequencies()[0, 1].item() == pytest.approx(500.0 ** (-2 / 16))
    assert torch.nn.functional.softplus(enc.phase_proj.bias).item() == pytest.approx(0.5)


def test_keys_that_change_nothing_in_the_original_are_accepted_with_the_reason(tmp_path, capsys):
    values, accepted = defaults()
    configure([write(tmp_path, "scale_attn_by_inverse_layer_idx = True\nrho = 0.1\n")], values, accepted)
    out = capsys.readouterr().out
    assert "'scale_attn_by_inverse_layer_idx'" in out and "none of its model files reads it" in out
    assert "'rho'" in out and "never reads it" in out


def test_kvshift_in_model_type_turns_on_kv_shift(tmp_path):
    cfg = resolve(write(tmp_path, "model_type = 'llama-mha-fox-kvshift'\n"))
    assert (cfg.pos_encoding, cfg.use_k_shift, cfg.use_v_shift) == ("fox", True, True)


@pytest.mark.parametrize("text, key", [("dropout = 0.1\n", "dropout"), ("bias = True\n", "bias"),
                                       ("tpa_kvrank = 2\n", "tpa_kvrank"), ("group_size = 11\n", "group_size"),
                                       ("model_type = 'llama-mha-tpa'\n", "model_type"),
                                       ("model_type = 'llama-mha-rope'\npos_encoding = 'alibi'\n", "model_type")])
def test_unsupported_original_settings_are_refused_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        resolve(write(tmp_path, text))


PAPER_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "config", "paper", "train_llama_mha_*_adam_80g8.py")))
# The original repository's 30 runs, among them Tables 1 and 2 of the paper: (size, kv-shift) -> encodings
PAPER_RUNS = {
    ("medium", False): {"rope", "grape_m_ctx", "grape_m", "alibi", "fox", "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap"},
    ("medium", True): {"rope", "grape_m_ctx", "grape_m", "alibi", "fox", "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap"},
    ("large", False): {"rope", "grape_m_ctx", "grape_m", "alibi", "fox", "grape_ap"},
    ("large", True): {"rope", "grape_m_ctx", "grape_m", "alibi", "fox", "grape_ap"},
}
# every config/*.py of the original resolved by its own training script (tests/make_original_goldens.py)
with open(os.path.join(ROOT, "tests", "golden", "original", "configs.json")) as f:
    ORIGINAL_CONFIGS = json.load(f)


def test_paper_configs_cover_the_original_runs():
    runs = {}
    for path in PAPER_CONFIGS:
        cfg = resolve(path)
        size = "medium" if cfg.n_layer == 24 else "large"
        runs.setdefault((size, cfg.use_k_shift), set()).add(cfg.pos_encoding)
    assert runs == PAPER_RUNS
    assert {os.path.basename(p) for p in PAPER_CONFIGS} == set(ORIGINAL_CONFIGS)


@pytest.mark.parametrize("name", sorted(ORIGINAL_CONFIGS))
def test_config_resolves_to_the_original_files_values(name):
    """Every key that shapes the model, data, optimisation or schedule has the value the original's
    training script gives it for the same-named original file (logging and paths aside:
    original_goldens.NOT_COMPARED says why), including the model_args it passes to the model."""
    cfg = resolve(os.path.join(ROOT, "config", "paper", name))
    assert config_mismatches(ORIGINAL_CONFIGS[name], with_fixed_keys(cfg)) == []


def test_config_comparison_sees_a_changed_value():
    name = "train_llama_mha_grape_m_ctx_kvshift_large_adam_80g8.py"
    cfg = with_fixed_keys(resolve(os.path.join(ROOT, "config", "paper", name)))
    for key, value in (("eval_iters", 200), ("grape_m_per_head", True), ("data_seed", 1337), ("rope_base", 500.0)):
        assert config_mismatches(ORIGINAL_CONFIGS[name], {**cfg, key: value}) != [], key


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=os.path.basename)
def test_paper_config_has_the_papers_hyperparameters(path):
    cfg = resolve(path)
    medium = cfg.n_layer == 24
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.head_dim) == ((24, 8, 1024, 128) if medium else (36, 10, 1280, 128))
    assert cfg.batch_size * cfg.gradient_accumulation_steps * 8 == 480 and cfg.block_size == 4096
    assert (cfg.learning_rate, cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (1e-3, 0.9, 0.95, 0.01, 1.0)
    assert (cfg.warmup_iters, cfg.min_lr, cfg.max_iters, cfg.lr_decay_iters) == (2000, 3e-5, 25000, 25000)
    assert cfg.dtype == "bfloat16" and cfg.compile and cfg.use_qk_rmsnorm and cfg.use_k_shift == cfg.use_v_shift
    if cfg.pos_encoding == "grape_ap":
        assert cfg.p_head_dim == 8


@pytest.mark.parametrize("size, expected", [("medium", 353e6), ("large", 770e6)])
def test_paper_sizes_give_the_papers_parameter_counts(size, expected):
    values = resolve(os.path.join(ROOT, "config", "paper", f"train_llama_mha_rope_{size}_adam_80g8.py"))
    config = GPTConfig(**{k: values[k] for k in ("n_layer", "n_head", "n_embd", "head_dim", "block_size", "pos_encoding")})
    with torch.device("meta"):
        n = GPT(config).num_parameters_unique()
    # by hand: tied embedding V*C, per layer 4 C^2 (attention) + 3 C floor(8C/3) (SwiGLU) + norms
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    by_hand = V * C + L * (4 * C * C + 3 * C * int(8 / 3 * C) + 2 * C + 2 * config.head_dim) + C
    assert n == by_hand
    assert abs(n - expected) / expected < 0.01


CPU_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "config", "cpu", "train_cpu_*.py"))
                     if not p.endswith("train_cpu_base.py"))    # the base holds shared settings only


def test_every_encoding_has_a_cpu_config():
    from grape import ENCODINGS
    assert {resolve(p).pos_encoding for p in CPU_CONFIGS} == set(ENCODINGS)


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=os.path.basename)
def test_cpu_configs_build_a_model(path):
    cfg = resolve(path)
    assert cfg.device == "cpu" and cfg.dataset == "pydoc" and not cfg.compile
    from training.configurator import model_fields
    with torch.device("meta"):
        GPT(GPTConfig(**{k: cfg[k] for k in model_fields()}))
