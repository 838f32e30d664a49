"""What a shared folder carries and what the tools around it do (issue 20, point 5).

- A model card (README.md) in every saved folder: the Hub's metadata (library, pipeline tag,
  license, datasets) and the run's facts (encoding, parameters, tokens seen, validation loss,
  config, how to load), checked against the training run's own checkpoint and log.
- In a process that cannot import this repository: a model loaded with the Auto classes and
  pushed to the Hub uploads its tokenizer and its card too; generate() refuses max_new_tokens
  beyond block_size before the first forward pass, naming from_pretrained(..., block_size=...);
  lm_eval finds the smoke task's data from another working directory; and the GRAPE-AP Triton
  kernel is reachable from the folder's code (run in Triton's interpreter against the dense path).
"""
import json
import os

import pytest
import torch
import yaml

from model import GPT, GPTConfig
from perturbation import perturb_parameters
from test_lm_eval_adapter import reference_loglikelihood
from test_training import data_dir, tiny  # noqa: F401  (data_dir: a fixture)
from train_adam_finewebedu import main
from training.checkpoint import load_checkpoint, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_TASKS = os.path.join(ROOT, "lm-evaluation-harness", "tasks")


def card(folder) -> tuple[dict, str]:
    """(YAML metadata, body) of a folder's README.md."""
    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_a_training_out_dir_carries_a_model_card_with_the_runs_facts(data_dir, tmp_path):
    shards = tmp_path / "fineweb-edu"                        # a dataset the Hub knows, by its folder name
    shards.symlink_to(data_dir)
    out = str(tmp_path / "run")
    result = main(tiny(str(shards), out, "--max_iters=4", "--eval_interval=2", "--pos_encoding=fox"))
    meta, body = card(out)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    state = load_checkpoint(out)
    n_params = sum(p.numel() for p in {id(p): p for p in result["model"].parameters()}.values())
    last_val = [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if "val_loss" in line][-1]
    assert state["iter_num"] == 4 == last_val["iter"]
    for fact in ("| positional encoding | `fox` |", f"| parameters | {n_params:,} |",
                 f"| tokens seen | {state['tokens']:,} (iteration 4) |", f"| validation loss | {last_val['val_loss']:.4f} |",
                 f"| training data | `{shards}` |", 'AutoModelForCausalLM.from_pretrained("<this folder or repo>", '
                 "trust_remote_code=True)", '"pos_encoding": "fox"', '"n_embd": 32'):
        assert fact in body, fact


def test_the_card_belongs_to_a_run_only_beside_its_config(tmp_path):
    """out_dir checks: README.md is a run's file beside a config.json this repository wrote (a
    resumed out_dir), anyone's own README otherwise (a folder the run must not take over)."""
    from training.out_dir_checks import foreign_entries
    (tmp_path / "README.md").write_text("my notes\n")
    assert foreign_entries(str(tmp_path)) == ["README.md"]
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)).save_pretrained(str(tmp_path / "run"))
    assert foreign_entries(str(tmp_path / "run")) == []


def test_a_folder_saved_outside_training_says_what_it_does_not_know(tmp_path):
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, pos_encoding="alibi")).save_pretrained(str(tmp_path))
    meta, body = card(str(tmp_path))
    assert {"library_name", "pipeline_tag", "license", "tags"} <= set(meta) and "datasets" not in meta
    assert "| tokens seen | not recorded (saved outside a training run) |" in body


OUTSIDE = r'''
import importlib, json, os, shutil, sys
import torch
from huggingface_hub import CommitOperationAdd, HfApi, RepoUrl
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
spec = json.load(open(sys.argv[1]))
out = {}
load = lambda path: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()

# push_to_hub of a model loaded with the Auto classes (the README's line), into a local "hub":
# transformers' and huggingface_hub's real code up to the two network calls
hub = spec["hub"]
def create_commit(api, repo_id, operations, **kw):
    for op in operations:
        target = os.path.join(hub, repo_id, op.path_in_repo)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with op.as_file() as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
HfApi.create_repo = lambda api, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}")
HfApi.create_commit = create_commit
model = load(spec["folder"])
model.push_to_hub("someone/pushed-after-loading")
pushed = os.path.join(hub, "someone", "pushed-after-loading")
out["pushed_files"] = sorted(os.listdir(pushed))
out["pushed_card"] = open(os.path.join(pushed, "README.md")).read()
tokenizer = AutoTokenizer.from_pretrained(pushed, trust_remote_code=True)
out["pushed_tokens"] = tokenizer("def f(x):")["input_ids"]
with torch.no_grad():
    out["pushed_logits"] = load(pushed)(torch.tensor([spec["ids"]])).logits

# max_new_tokens beyond block_size: refused before the first forward pass
calls = []
model.register_forward_pre_hook(lambda module, args: calls.append(1))
prompt = torch.tensor([spec["ids"][:10]])
for name, run in (("generate", lambda: model.generate(prompt, max_new_tokens=spec["block_size"])),
                  ("pipeline", lambda: pipeline("text-generation", model=model, tokenizer=tokenizer)(
                      "def f(x):", max_new_tokens=spec["block_size"]))):
    try:
        run()
        out[name] = "GENERATED"
    except ValueError as e:
        out[name] = str(e)
out["forward_calls"] = len(calls)

# lm_eval: the smoke task's data, found from this working directory (not the repository)
import lm_eval
from lm_eval.tasks import TaskManager
results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={spec['folder']},trust_remote_code=True",
                                  tasks=["grape_smoke"], batch_size=4, device="cpu", log_samples=True,
                                  task_manager=TaskManager(include_path=spec["tasks"], include_defaults=False))
out["cwd"] = os.getcwd()
out["smoke"] = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in results["samples"]["grape_smoke"]}

# the Triton kernel from the folder's own code (Triton's interpreter on CPU)
ap = load(spec["folder"])
attention = importlib.import_module(type(ap).__module__.rsplit(".", 1)[0] + ".attention")
out["attention_module"] = attention.__name__
layer = ap.transformer.h[0].attn
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 48, ap.config.n_embd, generator=g)
q, k, v = (torch.randn(1, ap.config.n_head, 48, ap.config.head_dim, generator=g) for _ in range(3))
with torch.no_grad():
    q, k, bias = layer.pos(x, q, k, v=v)
    out["backend_on_cuda"] = attention.choose_backend(q, bias, "cuda")
    out["triton"] = attention.attend(q, k, v, bias, "triton")
    out["dense"] = attention.attend(q, k, v, bias, "dense")
out["kernel_module"] = [m for m in sys.modules if m.endswith(".grape_ap_triton")]
torch.save(out, spec["out"])
'''


@pytest.fixture(scope="module")
def outside(tmp_path_factory, run_without_repository):
    root = tmp_path_factory.mktemp("outside")
    torch.manual_seed(6)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, pos_encoding="grape_ap",
                          use_k_shift=True))
    perturb_parameters(model, 0.05)
    folder = str(root / "folder")
    model.save_pretrained(folder, run_facts={"tokens": 12345, "iteration": 7, "val_loss": 3.25,
                                             "dataset": "data/fineweb-edu/fineweb-edu100B"})
    ids = torch.randint(0, 50000, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    spec = {"folder": folder, "hub": str(root / "hub"), "ids": ids, "block_size": 64, "tasks": SMOKE_TASKS,
            "out": str(root / "out.pt")}
    (root / "spec.json").write_text(json.dumps(spec))
    run_without_repository(OUTSIDE, str(root / "spec.json"), env={"TRITON_INTERPRET": "1"})
    return dict(spec=spec, model=model.eval(), report=torch.load(spec["out"]))


def test_push_to_hub_after_loading_uploads_the_tokenizer_and_the_card(outside):
    report, spec = outside["report"], outside["spec"]
    assert {"model.safetensors", "config.json", "model.py", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= set(report["pushed_files"])
    assert report["pushed_card"] == open(os.path.join(spec["folder"], "README.md")).read()
    assert "| tokens seen | 12,345 (iteration 7) |" in report["pushed_card"]
    from training.tokenizer import gpt2_encoding
    assert report["pushed_tokens"] == gpt2_encoding().encode("def f(x):")
    with torch.no_grad():
        torch.testing.assert_close(report["pushed_logits"], outside["model"](torch.tensor([spec["ids"]])).logits,
                                   rtol=0, atol=1e-5)


def test_max_new_tokens_is_checked_before_generating(outside):
    report = outside["report"]
    assert report["generate"] == ("prompt of 10 tokens + 64 new tokens needs a context of 73 > block_size=64; the "
                                  "cache cannot slide (cumulative and absolute state), so shorten the prompt or "
                                  "load the model with a larger block_size: from_pretrained(..., block_size=73)")
    assert "from_pretrained(..., block_size=" in report["pipeline"] and "\n" not in report["pipeline"]
    assert report["forward_calls"] == 0


def test_lm_eval_finds_the_smoke_tasks_data_from_another_directory(outside):
    report, model = outside["report"], load_model(outside["spec"]["folder"]).eval()
    assert not report["cwd"].startswith(ROOT)
    docs = [json.loads(line) for line in open(os.path.join(SMOKE_TASKS, "grape_smoke", "grape_smoke.jsonl"))]
    assert sorted(report["smoke"]) == list(range(len(docs)))
    for doc_id, loglikelihoods in report["smoke"].items():
        doc = docs[doc_id]
        want = [reference_loglikelihood(model, f"Question: {doc['question']}\nAnswer:", " " + c) for c in doc["choices"]]
        assert loglikelihoods == pytest.approx(want, abs=1e-4)


def test_the_triton_kernel_is_reachable_from_the_folders_code(outside):
    report = outside["report"]
    pytest.importorskip("triton")
    assert report["attention_module"].startswith("transformers_modules.")
    assert report["backend_on_cuda"] == "triton"                 # what a GPU run of this folder would take
    assert len(report["kernel_module"]) == 1 and report["kernel_module"][0].startswith("transformers_modules.")
    torch.testing.assert_close(report["triton"], report["dense"], rtol=2e-5, atol=2e-5)
