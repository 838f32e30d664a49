"""The lm_eval adapter, end to end and offline: lm_eval's own CLI on a tiny checkpoint and a
small local multiple-choice task; the loglikelihoods it logs must equal the model's own
log-softmax over the continuation tokens."""
import glob
import json
import os
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "lm-evaluation-harness")
sys.path.insert(0, REPO)
sys.path.insert(0, HARNESS)

from model import GPT, GPTConfig  # noqa: E402
from tokenizer import EOT, gpt2_encoding  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOCS = [  # contexts and choices of different token lengths, so batches need padding
    {"question": "The capital of France is", "choices": ["Paris", "a large city in Europe", "blue"], "label": 0},
    {"question": "Water boils at", "choices": ["one hundred degrees", "cold"], "label": 0},
    {"question": "A very long question that keeps going on and on about cats and dogs, and the answer is",
     "choices": ["yes", "no", "maybe not at all", "dogs"], "label": 3},
    {"question": "Two plus two equals", "choices": ["four", "five"], "label": 0},
]

TASK_YAML = """task: grape_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt")
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, pos_encoding="alibi")
    model = GPT(config).eval()
    model.save_pretrained(str(folder))
    return str(folder), GPT.load(str(folder)).eval()


def reference_loglikelihood(model, context: str, continuation: str) -> float:
    """Independent: one unbatched forward on context+continuation, sum of log-probs."""
    enc = gpt2_encoding()
    ctx, whole = enc.encode(context), enc.encode(context + continuation)
    assert whole[:len(ctx)] == ctx
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]))
    logprobs = F.log_softmax(logits[0], dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + i, tok]) for i, tok in enumerate(cont))


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """Task folder for --include_path: the YAML and its jsonl data, nothing downloaded."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "grape_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    return str(folder)


@pytest.fixture
def local_tasks_only(monkeypatch):
    """lm_eval's CLI indexes all of its ~14k built-in task YAMLs (~20 s); these tests only
    need their own task, so lm_eval's TaskManager is told to skip the built-ins."""
    import lm_eval.tasks

    class LocalTasksOnly(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)


def test_lm_eval_cli_loglikelihoods_equal_model_logprobs(tiny_checkpoint, local_task, local_tasks_only,
                                                          tmp_path, monkeypatch):
    folder, model = tiny_checkpoint
    tasks = local_task
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", [
        "lm_eval_grape.py", "--model", "grape", "--model_args", f"pretrained={folder}",
        "--tasks", "grape_tiny_mc", "--include_path", tasks, "--batch_size", "3",
        "--device", "cpu", "--output_path", str(out), "--log_samples",
    ])
    runpy.run_path(os.path.join(HARNESS, "lm_eval_grape.py"), run_name="__main__")

    samples = [json.loads(line) for path in glob.glob(str(out / "**" / "samples_grape_tiny_mc_*.jsonl"),
                                                        recursive=True) for line in open(path)]
    assert len(samples) == len(DOCS)
    n_checked = 0
    for sample in samples:
        doc = DOCS[sample["doc_id"]]
        got = [float(r[0][0]) for r in sample["resps"]]
        want = [reference_loglikelihood(model, doc["question"], " " + c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-4)
        # and acc is the argmax of those loglikelihoods
        assert sample["acc"] == float(max(range(len(want)), key=want.__getitem__) == doc["label"])
        n_checked += len(want)
    assert n_checked == sum(len(d["choices"]) for d in DOCS)


def make_instance(request_type, arguments, idx=0):
    from lm_eval.api.instance import Instance
    return Instance(request_type=request_type, doc={}, arguments=arguments, idx=idx)


def test_loglikelihood_rolling_equals_summed_token_nll(tiny_checkpoint):
    import grape_lm
    _, model = tiny_checkpoint
    lm = grape_lm.GrapeLM(pretrained=model, batch_size=2, max_length=16)
    texts = ["Hello world, this is a short text that spans several windows of sixteen tokens each.",
             "Tiny."]
    got = lm.loglikelihood_rolling([make_instance("loglikelihood_rolling", (t,), i)
                                    for i, t in enumerate(texts)])
    enc = gpt2_encoding()
    for text, value in zip(texts, got):
        # independent: EOT + text read left to right in disjoint windows of 16, each token
        # conditioned on everything in its window before it (the harness's rolling scheme)
        tokens = [EOT] + enc.encode(text)
        total, start = 0.0, 0
        while start + 1 < len(tokens):
            end = min(start + 16, len(tokens) - 1)
            lo = max(0, end - 16)              # the last window keeps a full context
            with torch.no_grad():
                logits, _ = model(torch.tensor([tokens[lo:end]]))
            logprobs = F.log_softmax(logits[0], dim=-1)
            for t in range(start, end):
                total += float(logprobs[t - lo, tokens[t + 1]])
            start = end
        assert value == pytest.approx(total, abs=1e-3)


def test_generate_until_returns_text_cut_at_stop_sequence(tiny_checkpoint):
    import grape_lm
    _, model = tiny_checkpoint
    lm = grape_lm.GrapeLM(pretrained=model, batch_size=3)
    enc = gpt2_encoding()
    prompts = ["Once upon a time", "The", "A much longer prompt than the others, by far"]

    def greedy(prompt, n):  # independent greedy decoding, full forward each step, no cache
        toks = enc.encode(prompt)
        for _ in range(n):
            with torch.no_grad():
                logits, _ = model(torch.tensor([toks]))
            toks.append(int(logits[0, -1, :50257].argmax()))
        return enc.decode(toks[len(enc.encode(prompt)):])

    plain = lm.generate_until([make_instance("generate_until", (p, {"until": ["\n\n"], "max_gen_toks": 6}), i)
                               for i, p in enumerate(prompts)])
    assert all(isinstance(s, str) for s in plain)
    for prompt, text in zip(prompts, plain):
        assert text == greedy(prompt, 6).split("\n\n")[0].split("<|endoftext|>")[0]

    # stop at a string the model actually produces: everything from it on is cut
    full = greedy(prompts[0], 6)
    stop = full[len(full) // 2:][:2] if len(full) >= 4 else full
    cut = lm.generate_until([make_instance("generate_until", (prompts[0], {"until": [stop], "max_gen_toks": 6}))])[0]
    assert cut == full.split(stop)[0]
    assert stop not in cut


def test_paper_eval_table_reports_lm_eval_accuracy_and_average(tiny_checkpoint, local_task, local_tasks_only,
                                                               tmp_path):
    import run_paper_eval
    folder, model = tiny_checkpoint
    text = run_paper_eval.main([folder, "--labels", "a", "--tasks", "grape_tiny_mc,grape_tiny_mc",
                                "--include_path", local_task, "--batch_size", "4", "--device", "cpu",
                                "--output_dir", str(tmp_path)])
    # independent accuracy: argmax of the model's own continuation log-probs
    correct = [max(range(len(d["choices"])), key=lambda i: reference_loglikelihood(
        model, d["question"], " " + d["choices"][i])) == d["label"] for d in DOCS]
    acc = 100.0 * sum(correct) / len(DOCS)
    lines = text.splitlines()
    assert lines[0] == "| Method | grape_tiny_mc | grape_tiny_mc | Avg. |"
    assert lines[2] == f"| a | {acc:.2f} | {acc:.2f} | {acc:.2f} |"
    assert (tmp_path / "table.md").read_text().strip() == text


def test_paper_table_average_is_the_mean_of_the_seven_tasks():
    import run_paper_eval
    columns = [c for c, _, _ in run_paper_eval.PAPER_TASKS]
    assert columns == ["ARC-E", "ARC-C", "HellaSwag", "OBQA", "PIQA", "WinoGrande", "SciQ"]
    rope = [56.36, 30.38, 44.65, 35.20, 68.77, 52.33, 74.40]   # the paper's Table 1, RoPE row
    assert run_paper_eval.table([("RoPE", rope)], columns).splitlines()[2].endswith("| 51.73 |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_cuda_request_without_a_gpu_runs_on_cpu(tiny_checkpoint):
    """lm_eval's CLI passes --device cuda by default; without a GPU the adapter must still run."""
    import grape_lm
    folder, _ = tiny_checkpoint
    lm = grape_lm.GrapeLM(pretrained=folder, device="cuda", batch_size=1)
    assert lm._device.type == "cpu"
    assert next(lm.model.parameters()).device.type == "cpu"
