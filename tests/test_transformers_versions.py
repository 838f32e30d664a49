"""Folders keep working across transformers releases (issue 20, point 2).

A folder written here (the pinned transformers) is opened in a process that cannot import this
repository under three releases: the oldest the folders support (``MIN_TRANSFORMERS``), the pinned
one, and the newest at the time of writing (5.24 and 5.25 pass the decoding cache as ``cache``,
which folders written before this change refused). Each runs the logits, generate() on one prompt
and on a left-padded batch, pipeline with batch_size > 1, and an lm_eval loglikelihood task, all
against computations made here from the weights (``load_model``, greedy recomputation, the log-softmax
of each continuation). A release older than the minimum refuses the folder in one line naming it.

The extra releases are installed here with ``pip install --no-deps --target`` into a cache folder
(pytest's cache, ``.pytest_cache/d/transformers-releases``, so a later session reuses them; set
GRAPE_TRANSFORMERS_CACHE to put it elsewhere), together with the few packages whose pinned versions
those releases cannot use; the project's environment is not touched. Installing needs PyPI (about
100 MB the first time)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import transformers

from model import EOT, GPT, GPTConfig
from modeling.shipping import MIN_TRANSFORMERS
from perturbation import perturb_parameters
from test_lm_eval_adapter import DOCS, TASK_YAML, reference_loglikelihood
from training.checkpoint import load_model
from training.tokenizer import gpt2_encoding

# name -> (release, what pip installs into its target; None: the environment's own)
RELEASES = {
    "oldest supported": (MIN_TRANSFORMERS, [f"transformers=={MIN_TRANSFORMERS}", "huggingface_hub==1.33.0",
                                            "tokenizers==0.22.2"]),
    "pinned": (transformers.__version__, None),
    "newest": ("5.25.0", ["transformers==5.25.0", "kernels==0.19.1"]),
}
TOO_OLD = ("4.57.6", ["transformers==4.57.6", "huggingface_hub==0.36.0", "tokenizers==0.22.2"])
PROMPTS = ["def f(x):", "The quick brown fox jumps over the lazy dog, and", "import os"]
NEW = 5


def release_cache(config) -> str:
    root = os.environ.get("GRAPE_TRANSFORMERS_CACHE") or str(config.cache.mkdir("transformers-releases"))
    os.makedirs(root, exist_ok=True)
    return root


def installed(root: str, requirements: list[str]) -> str:
    """A --target folder holding ``requirements`` (installed once; reused while complete)."""
    key = hashlib.sha256(" ".join(sorted(requirements)).encode()).hexdigest()[:12]
    target = os.path.join(root, f"{requirements[0].replace('==', '-')}-{key}")
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    staging = tempfile.mkdtemp(dir=root, prefix=".installing-")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                             "--no-warn-conflicts", "--target", staging, *requirements],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.fail(f"pip could not install {requirements} (PyPI needed): {result.stderr.strip()[-500:]}")
    open(os.path.join(staging, ".complete"), "w").close()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


PROBE = r'''
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
spec = json.load(open(sys.argv[1]))
folder = spec["folder"]
out = {"version": transformers.__version__}
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    out["logits"] = model(torch.tensor([spec["ids"]])).logits
one = tokenizer(spec["prompts"][0], return_tensors="pt")
out["generate"] = model.generate(**one, max_new_tokens=spec["new"], do_sample=False)[0].tolist()
batch = tokenizer(spec["prompts"], return_tensors="pt", padding=True)
out["generate_padded"] = model.generate(**batch, max_new_tokens=spec["new"], do_sample=False).tolist()
out["padded_width"] = batch["input_ids"].shape[1]
generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
out["pipeline"] = [r[0]["generated_text"] for r in generator(spec["prompts"], batch_size=3,
                                                              max_new_tokens=spec["new"], do_sample=False)]
import lm_eval
from lm_eval.tasks import TaskManager
results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True",
                                  tasks=["grape_tiny_mc"], batch_size=3, device="cpu", log_samples=True,
                                  task_manager=TaskManager(include_path=spec["tasks"], include_defaults=False))
out["lm_eval"] = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in results["samples"]["grape_tiny_mc"]}
torch.save(out, spec["out"])
'''

TOO_OLD_PROBE = r'''
import sys
import transformers
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    print("LOADED")
except ImportError as e:
    print(f"{transformers.__version__}|{e}")
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A GRAPE-AP folder with KV-shift (probes, running sums and shifted projections in the
    cache), written by the pinned transformers; the lm_eval task beside it."""
    root = tmp_path_factory.mktemp("versions")
    torch.manual_seed(4)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=300, pos_encoding="grape_ap",
                          use_k_shift=True, use_v_shift=True))
    perturb_parameters(model, 0.05)
    model.save_pretrained(str(root / "folder"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "grape_tiny_mc.yaml").write_text(TASK_YAML.format(data=tasks / "tiny.jsonl"))
    return root


def greedy(model, tokens: list[int], n: int) -> list[int]:
    tokens = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]), logits_to_keep=1).logits[0, -1].argmax()))
    return tokens


def until_eos(tokens: list[int]) -> list[int]:
    return tokens[:tokens.index(EOT) + 1] if EOT in tokens else tokens


@pytest.mark.parametrize("release", list(RELEASES))
def test_a_folder_works_under_each_supported_release(release, folder, request, run_without_repository, tmp_path):
    version, requirements = RELEASES[release]
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    if requirements is not None:
        env["PYTHONPATH"] = installed(release_cache(request.config), requirements)
    ids = torch.randint(0, EOT, (260,), generator=torch.Generator().manual_seed(0)).tolist()
    spec = {"folder": str(folder / "folder"), "ids": ids, "prompts": PROMPTS, "new": NEW,
            "tasks": str(folder / "tasks"), "out": str(tmp_path / "out.pt")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_without_repository(PROBE, str(tmp_path / "spec.json"), env=env)
    got = torch.load(spec["out"])
    assert got["version"] == version

    model, enc = load_model(spec["folder"]).eval(), gpt2_encoding()
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(torch.tensor([ids])).logits, rtol=0, atol=1e-5)
    prompts = [enc.encode(p) for p in PROMPTS]
    assert got["generate"] == greedy(model, prompts[0], NEW)
    width = got["padded_width"]
    for row, prompt in zip(got["generate_padded"], prompts):
        assert row[width - len(prompt):width] == prompt                      # left padded
        assert until_eos(row[width:]) == until_eos(greedy(model, prompt, NEW)[len(prompt):])
    assert got["pipeline"] == [p + enc.decode([t for t in until_eos(greedy(model, q, NEW)[len(q):]) if t != EOT])
                               for p, q in zip(PROMPTS, prompts)]
    for doc_id, loglikelihoods in got["lm_eval"].items():
        doc = DOCS[doc_id]
        want = [reference_loglikelihood(model, doc["question"], " " + c) for c in doc["choices"]]
        assert loglikelihoods == pytest.approx(want, abs=1e-4)
    assert len(got["lm_eval"]) == len(DOCS)


def test_a_release_older_than_the_minimum_says_so_in_one_line(folder, request, run_without_repository, tmp_path):
    version, requirements = TOO_OLD
    env = {"PYTHONPATH": installed(release_cache(request.config), requirements),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    line = run_without_repository(TOO_OLD_PROBE, str(folder / "folder"), env=env).stdout.strip().splitlines()[-1]
    assert line == (f"{version}|this GRAPE checkpoint needs transformers >= {MIN_TRANSFORMERS}, but {version} is "
                    f"installed: pip install -U 'transformers>={MIN_TRANSFORMERS}'")


def test_requirements_and_readme_state_the_minimum():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    requirements = open(os.path.join(root, "requirements.txt")).read()
    assert f"transformers >= {MIN_TRANSFORMERS}" in requirements
    for page in ("README.md", "docs/checkpoints.md"):
        text = open(os.path.join(root, page)).read()
        assert f"transformers {MIN_TRANSFORMERS}" in text and RELEASES["newest"][0] in text, page
