"""A saved folder is a Hugging Face checkpoint: a fresh process that cannot import this
repository (nor triton) opens it with AutoConfig / AutoModelForCausalLM (trust_remote_code) /
AutoTokenizer / pipeline and gets the logits ``load_model`` gives; the tokenizer is GPT-2's
(checked against tiktoken); generate() stops at <|endoftext|>; the folders the training writes,
``push_to_hub`` uploads and a remotely loaded model re-saves open the same way.

One clean process serves every test (transformers and torch load once); each test checks its
part of what that process reported."""
import json
import os
import shutil
import sys

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, RepoUrl
from transformers.dynamic_module_utils import get_imports, get_relative_import_files, get_relative_imports

from modeling import shipping
from training.checkpoint import save_checkpoint, load_model
from grape import ENCODINGS, GRID_ENCODINGS
from model import EOT, GPT, GPTConfig
from perturbation import perturb_parameters
from training.tokenizer import gpt2_encoding

T = 256                       # long enough for the chunked attention path on CPU
PROMPT = "The GRAPE"
TEXTS = ["Hello world", " leading space,  two spaces\n\n\ttab", "def f(x):\n    return x ** 2  # ünïcödé",
         "日本語 and emoji 🤗's", "one<|endoftext|>two", ""]
# every encoding, and KV-shift on an additive and on a composed one
VARIANTS = {name: dict(pos_encoding=name, grid=(16, 16) if name in GRID_ENCODINGS else None)
            for name in sorted(ENCODINGS)}
VARIANTS["grape_ap_kvshift"] = dict(pos_encoding="grape_ap", use_k_shift=True, use_v_shift=True)
VARIANTS["rope+grape_ap_kvshift"] = dict(pos_encoding="rope+grape_ap", use_k_shift=True, use_v_shift=True)

CLEAN_PROCESS = r'''
import json, sys
sys.modules["triton"] = None          # as where triton is not installed: importing it fails
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

spec = json.load(open(sys.argv[1]))
ids = torch.tensor([spec["ids"]])
out = {"logits": {}, "classes": {}}
for name, folder in spec["folders"].items():
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out["logits"][name] = model(ids).logits
    out["classes"][name] = [type(config).__module__, type(config).__name__, type(model).__module__,
                            type(model).__name__]

tokenizer = AutoTokenizer.from_pretrained(spec["folders"]["rope"])          # no trust_remote_code
out["tokenizer"] = {"ids": [tokenizer(t)["input_ids"] for t in spec["texts"]],
                    "decoded": [tokenizer.decode(tokenizer(t)["input_ids"]) for t in spec["texts"]],
                    "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}

prompt = tokenizer(spec["prompt"], return_tensors="pt")
for name in ("rope", "eos_first"):
    model = AutoModelForCausalLM.from_pretrained(spec["folders"][name], trust_remote_code=True).eval()
    out["generate_" + name] = model.generate(**prompt, max_new_tokens=8, do_sample=False)[0].tolist()

generator = pipeline("text-generation", model=spec["folders"]["rope"], trust_remote_code=True)
out["pipeline"] = generator(spec["prompt"], max_new_tokens=8, do_sample=False)[0]["generated_text"]

# a model loaded as remote code, saved again, opens again
model = AutoModelForCausalLM.from_pretrained(spec["folders"]["grape_ap_kvshift"], trust_remote_code=True).eval()
model.save_pretrained(spec["resaved"])
again = AutoModelForCausalLM.from_pretrained(spec["resaved"], trust_remote_code=True).eval()
with torch.no_grad():
    out["logits_resaved"] = again(ids).logits
torch.save(out, spec["out"])
'''


def perturbed_model(seed: int, **settings) -> GPT:
    """A tiny model with every parameter moved off its init (zero-init encodings included), so a
    loader that dropped or misplaced any parameter would change the logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=T, **settings)).eval()
    perturb_parameters(model, 0.05)
    with torch.no_grad():
        model.transformer.wte.weight[EOT + 1:] = 0        # padded vocabulary rows: never the argmax
    return model


def greedy(model: GPT, tokens: list, n: int) -> list:
    """Independent of generate(): a full forward pass per new token, no cache."""
    tokens = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens


def eos_first_model() -> GPT:
    """A model whose greedy first token after PROMPT is <|endoftext|>: the embedding rows (tied
    with lm_head) of its natural first token and of <|endoftext|> swapped."""
    model = perturbed_model(1, pos_encoding="rope")
    prompt = gpt2_encoding().encode(PROMPT)
    first = greedy(model, prompt, 1)[-1]
    assert first not in prompt and first != EOT
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte[[first, EOT]] = wte[[EOT, first]]
    assert greedy(model, prompt, 1)[-1] == EOT
    return model


class LocalHub:
    """The two network calls push_to_hub makes (create_repo, create_commit) answered by a local
    folder; everything before them (save_pretrained into a temporary folder, collecting its files
    into commit operations) is transformers' real code."""

    def __init__(self, root, monkeypatch):
        self.root = root
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: self.create_repo(repo_id))
        monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw:
                            self.create_commit(repo_id, operations))

    def create_repo(self, repo_id):
        os.makedirs(os.path.join(self.root, repo_id), exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations):
        for op in operations:
            assert isinstance(op, CommitOperationAdd)
            target = os.path.join(self.root, repo_id, op.path_in_repo)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with op.as_file() as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, run_without_repository):
    """Folders of every kind, and what the clean process reported about them."""
    root = tmp_path_factory.mktemp("hf_folders")
    folders, models = {}, {}
    for i, (name, settings) in enumerate(VARIANTS.items()):
        models[name] = perturbed_model(10 + i, **settings)
        folders[name] = str(root / name.replace("+", "_"))
        models[name].save_pretrained(folders[name])
    models["eos_first"] = eos_first_model()
    folders["eos_first"] = str(root / "eos_first")
    models["eos_first"].save_pretrained(folders["eos_first"])

    # what the training writes: checkpoint.save_checkpoint (ckpt.pt + save_pretrained files)
    models["training_out_dir"] = perturbed_model(2, pos_encoding="fox", use_k_shift=True, use_v_shift=True)
    folders["training_out_dir"] = str(root / "out-fox")
    state = {"model": models["training_out_dir"].state_dict(), "optimizer": {}, "iter_num": 3,
             "model_config": models["training_out_dir"].config.to_dict()}
    save_checkpoint(folders["training_out_dir"], state, models["training_out_dir"])

    # push_to_hub, and save_pretrained(push_to_hub=True), into a local "hub"
    with pytest.MonkeyPatch.context() as monkeypatch:
        LocalHub(str(root / "hub"), monkeypatch)
        models["pushed"] = perturbed_model(3, pos_encoding="grape_a_qk")
        models["pushed"].push_to_hub("someone/tiny-grape")
        models["saved_and_pushed"] = perturbed_model(4, pos_encoding="alibi")
        models["saved_and_pushed"].save_pretrained(str(root / "local"), push_to_hub=True,
                                                   repo_id="someone/pushed-on-save")
    folders["pushed"] = str(root / "hub" / "someone" / "tiny-grape")
    folders["saved_and_pushed"] = str(root / "hub" / "someone" / "pushed-on-save")

    ids = torch.randint(0, EOT, (T,), generator=torch.Generator().manual_seed(0)).tolist()
    spec = {"folders": folders, "ids": ids, "texts": TEXTS, "prompt": PROMPT,
            "resaved": str(root / "resaved"), "out": str(root / "report.pt")}
    (root / "spec.json").write_text(json.dumps(spec))
    run_without_repository(CLEAN_PROCESS, str(root / "spec.json"))
    return dict(spec=spec, models=models, report=torch.load(spec["out"]))


def reference_logits(model: GPT, ids: list) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("name", list(VARIANTS))
def test_auto_model_from_folder_gives_the_logits_of_gpt_load(saved, name):
    folder = saved["spec"]["folders"][name]
    want = reference_logits(load_model(folder).eval(), saved["spec"]["ids"])
    torch.testing.assert_close(saved["report"]["logits"][name], want, rtol=0, atol=1e-5)
    config_module, config_class, model_module, model_class = saved["report"]["classes"][name]
    # the classes came from the folder's own code, through transformers' remote-code loader
    assert config_module.startswith("transformers_modules.") and config_class == "GPTConfig"
    assert model_module.startswith("transformers_modules.") and model_class == "GPT"


def test_training_checkpoint_folder_opens_with_auto_classes(saved):
    folder = saved["spec"]["folders"]["training_out_dir"]
    from_ckpt_pt = load_model(os.path.join(folder, "ckpt.pt")).eval()
    torch.testing.assert_close(saved["report"]["logits"]["training_out_dir"],
                               reference_logits(from_ckpt_pt, saved["spec"]["ids"]), rtol=0, atol=1e-5)
    assert not any(name.startswith(".pretrained.") for name in os.listdir(folder))   # temp folder gone


@pytest.mark.parametrize("name", ["pushed", "saved_and_pushed"])
def test_push_to_hub_uploads_a_folder_that_opens_with_auto_classes(saved, name):
    folder = saved["spec"]["folders"][name]
    uploaded = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "generation_config.json", "model.py", "tokenizer.json",
            "README.md"} <= uploaded
    torch.testing.assert_close(saved["report"]["logits"][name],
                               reference_logits(saved["models"][name], saved["spec"]["ids"]), rtol=0, atol=1e-5)


def test_remote_code_model_saved_again_opens_again(saved):
    want = reference_logits(saved["models"]["grape_ap_kvshift"], saved["spec"]["ids"])
    torch.testing.assert_close(saved["report"]["logits_resaved"], want, rtol=0, atol=1e-5)


def test_folder_tokenizer_is_gpt2_bpe_as_tiktoken_encodes_it(saved):
    report, enc = saved["report"]["tokenizer"], gpt2_encoding()
    assert report["ids"] == [enc.encode(t, allowed_special="all") for t in TEXTS]
    assert report["decoded"] == TEXTS
    assert report["eos"] == report["bos"] == EOT


def test_generate_stops_at_endoftext(saved):
    prompt = gpt2_encoding().encode(PROMPT)
    assert saved["report"]["generate_eos_first"] == prompt + [EOT]
    # without <|endoftext|> it runs to max_new_tokens and equals greedy recomputation
    want = greedy(saved["models"]["rope"], prompt, 8)
    assert EOT not in want and saved["report"]["generate_rope"] == want


def test_text_generation_pipeline_writes_the_greedy_continuation(saved):
    enc = gpt2_encoding()
    prompt = enc.encode(PROMPT)
    continuation = greedy(saved["models"]["rope"], prompt, 8)[len(prompt):]
    assert saved["report"]["pipeline"] == PROMPT + enc.decode(continuation)


def test_shipped_code_needs_only_torch_and_transformers(tmp_path):
    """transformers' own import check (which a Hub download runs on every shipped file) must
    find nothing beyond torch, transformers (with huggingface_hub and safetensors, which it
    requires) and the standard library; triton stays optional."""
    files = shipping.write_code(str(tmp_path))
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "huggingface_hub", "safetensors"}
    for name in files:
        assert set(get_imports(str(tmp_path / name))) <= allowed, name
    # the files transformers copies along with model.py are exactly the ones written
    copied = {os.path.basename(f) for f in get_relative_import_files(str(tmp_path / "model.py"))}
    assert copied == set(files) - {"model.py"}
    # releases before 5.10.1 copy only the files model.py itself imports: it must name them all
    direct = {f"{name}.py" for name in get_relative_imports(str(tmp_path / "model.py"))}
    assert direct == set(files) - {"model.py"}
    assert {"model.py", "grape.py", "attention.py", "generation.py", "padding.py", "hf_forward.py"} <= set(files)
    assert "shipping.py" in files and "tokenizer.py" not in files and "checkpoint.py" not in files


def test_code_files_flattens_the_package_and_makes_imports_relative(tmp_path, monkeypatch):
    """The root's modules import the shipped package absolutely and each other by name; the
    package's modules import each other relatively. In the folder every file sits flat, and
    every import transformers must follow reads 'from .name import'."""
    (tmp_path / "top.py").write_text(
        "from __future__ import annotations\nimport os\nfrom torch import nn\nfrom helper import f  # why\n"
        "from modeling.attn import a\n"
        "def g():\n    from modeling.lazy import h\n    return h\n")
    (tmp_path / "helper.py").write_text("from modeling.lazy import h\nf = 1\n")
    (tmp_path / "modeling").mkdir()
    (tmp_path / "modeling" / "attn.py").write_text("from .lazy import h\na = 1\n")
    (tmp_path / "modeling" / "lazy.py").write_text("h = 2\n")
    (tmp_path / "unused.py").write_text("x = 3\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "repo_only.py").write_text("y = 4\n")
    monkeypatch.setattr(shipping, "ROOT", str(tmp_path))
    files = shipping.code_files("top")
    assert files == {
        "top.py": "from __future__ import annotations\nimport os\nfrom torch import nn\nfrom .helper import f  # why\n"
                  "from .attn import a\n"
                  "def g():\n    from .lazy import h\n    return h\n",
        "helper.py": "from .lazy import h\nf = 1\n",
        "attn.py": "from .lazy import h\na = 1\n",
        "lazy.py": "h = 2\n",
    }
    (tmp_path / "top.py").write_text("import helper\n")
    with pytest.raises(ValueError, match="import helper"):
        shipping.code_files("top")
    (tmp_path / "top.py").write_text("from training.repo_only import y\n")
    with pytest.raises(ValueError, match="not shipped code"):       # repository-only code never ships
        shipping.code_files("top")
    with pytest.raises(ValueError, match="repository itself"):   # never overwrite the sources
        shipping.write_code(str(tmp_path))
