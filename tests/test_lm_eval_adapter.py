"""The lm_eval adapter, end to end and offline: lm_eval's own CLI on a tiny checkpoint and a
small local multiple-choice task; the loglikelihoods it logs must equal the model's own
log-softmax over the continuation tokens."""
import glob
import inspect
import json
import os
import runpy
import sys

import lm_eval.tasks
import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "lm-evaluation-harness")
sys.path.insert(0, REPO)
sys.path.insert(0, HARNESS)

from model import GPT, GPTConfig  # noqa: E402
from training.checkpoint import load_model
from training.tokenizer import EOT, gpt2_encoding  # noqa: E402

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

ROLLING_DOCS = [  # the last is longer than the 64-token context, so its windows roll
    {"text": "A short document."},
    {"text": "Another one, with some punctuation: commas, colons; and semicolons!"},
    {"text": " ".join(f"word{i} and then some more words" for i in range(20))},
]

ROLLING_YAML = """task: grape_tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
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
    return str(folder), load_model(str(folder)).eval()


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
    rolling = folder / "rolling.jsonl"
    rolling.write_text("".join(json.dumps(d) + "\n" for d in ROLLING_DOCS))
    (folder / "grape_tiny_rolling.yaml").write_text(ROLLING_YAML.format(data=rolling))
    return str(folder)


class LocalTasksOnly(lm_eval.tasks.TaskManager):
    """lm_eval's CLI indexes all of its ~14k built-in task YAMLs (~20 s); these tests only
    need their own tasks, so lm_eval's TaskManager is told to skip the built-ins."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "include_defaults": False})


@pytest.fixture
def local_tasks_only(monkeypatch):
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)


def read_results(out_dir) -> tuple[dict, dict]:
    """lm_eval's --output_path: ({task: [logged samples by doc_id]}, {task: aggregated metrics})."""
    samples = {}
    for path in glob.glob(os.path.join(out_dir, "**", "samples_*.jsonl"), recursive=True):
        task = os.path.basename(path)[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
    (results_path,) = glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True)
    return samples, json.load(open(results_path))["results"]


BOTH_TASKS = "grape_tiny_mc,grape_tiny_rolling"


def run_grape_cli(model_args: str, tasks: str, local_task: str, out) -> tuple[dict, dict]:
    """lm_eval's CLI with our adapter (--model grape), samples logged; read_results of its output."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)
        monkeypatch.setattr(sys, "argv", [
            "lm_eval_grape.py", "--model", "grape", "--model_args", model_args,
            "--tasks", tasks, "--include_path", local_task, "--batch_size", "3",
            "--device", "cpu", "--output_path", str(out), "--log_samples",
        ])
        runpy.run_path(os.path.join(HARNESS, "lm_eval_grape.py"), run_name="__main__")
    return read_results(str(out))


@pytest.fixture(scope="module")
def grape_cli_results(tiny_checkpoint, local_task, tmp_path_factory):
    """The adapter on both local tasks."""
    folder, _ = tiny_checkpoint
    return run_grape_cli(f"pretrained={folder}", BOTH_TASKS, local_task, tmp_path_factory.mktemp("grape_results"))


def test_lm_eval_cli_loglikelihoods_equal_model_logprobs(tiny_checkpoint, grape_cli_results):
    _, model = tiny_checkpoint
    samples = grape_cli_results[0]["grape_tiny_mc"]
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


# lm_eval's own CLI with its own `hf` model, in a process that cannot import this repository
LM_EVAL_HF_CLI = "import sys\nimport lm_eval.tasks\n" + inspect.getsource(LocalTasksOnly) + """
lm_eval.tasks.TaskManager = LocalTasksOnly
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval", *sys.argv[1:]]
cli_evaluate()
"""


def loglikelihoods(sample) -> list:
    """The logged loglikelihood of each request of a sample (multiple choice: [ll, is_greedy])."""
    return [float(r[0][0] if isinstance(r[0], list) else r[0]) for r in sample["resps"]]


def test_lm_eval_hf_model_on_the_folder_gives_the_adapters_numbers(tiny_checkpoint, local_task, grape_cli_results,
                                                                   run_without_repository, tmp_path):
    folder, _ = tiny_checkpoint
    run_without_repository(LM_EVAL_HF_CLI, "--model", "hf", "--model_args",
                           f"pretrained={folder},trust_remote_code=True", "--tasks", BOTH_TASKS,
                           "--include_path", local_task, "--batch_size", "3", "--device", "cpu",
                           "--output_path", str(tmp_path), "--log_samples")
    hf_samples, hf_metrics = read_results(str(tmp_path))
    grape_samples, grape_metrics = grape_cli_results
    assert sorted(hf_samples) == sorted(grape_samples) == ["grape_tiny_mc", "grape_tiny_rolling"]
    for task in hf_samples:
        assert [s["doc_id"] for s in hf_samples[task]] == [s["doc_id"] for s in grape_samples[task]]
        for hf, grape in zip(hf_samples[task], grape_samples[task]):
            assert loglikelihoods(hf) == pytest.approx(loglikelihoods(grape), abs=1e-4)
    # every aggregated number: acc (and its stderr), word/byte perplexity, bits per byte
    assert {"acc,none", "word_perplexity,none", "bits_per_byte,none"} <= \
        set(hf_metrics["grape_tiny_mc"]) | set(hf_metrics["grape_tiny_rolling"])
    for task in hf_metrics:
        assert set(hf_metrics[task]) == set(grape_metrics[task])
        for key, value in hf_metrics[task].items():
            want = grape_metrics[task][key]
            assert value == (pytest.approx(want, rel=1e-5) if isinstance(want, float) else want), key


def test_block_size_evaluates_beyond_the_training_context_in_both_models(tiny_checkpoint, local_task, grape_cli_results,
                                                                          run_without_repository, tmp_path):
    """README: `block_size=` in --model_args works with lm_eval's hf model (it passes unknown
    model_args to from_pretrained) and with the adapter. At 128 tokens the long rolling document
    (more than the 64 trained) is read in fewer windows: its loglikelihood changes, the short ones
    do not, and both models agree."""
    folder, _ = tiny_checkpoint
    run_without_repository(LM_EVAL_HF_CLI, "--model", "hf", "--model_args",
                           f"pretrained={folder},trust_remote_code=True,block_size=128", "--tasks",
                           "grape_tiny_rolling", "--include_path", local_task, "--batch_size", "3", "--device", "cpu",
                           "--output_path", str(tmp_path / "hf"), "--log_samples")

    def per_document(samples):                                      # one rolling loglikelihood each
        return [ll for s in samples["grape_tiny_rolling"] for ll in loglikelihoods(s)]
    hf = per_document(read_results(str(tmp_path / "hf"))[0])
    grape = per_document(run_grape_cli(f"pretrained={folder},block_size=128", "grape_tiny_rolling", local_task,
                                       tmp_path / "grape")[0])
    at_64 = per_document(grape_cli_results[0])
    assert len(hf) == len(ROLLING_DOCS) and hf == pytest.approx(grape, abs=1e-4)
    assert hf[:2] == pytest.approx(at_64[:2], abs=1e-4)              # short documents: one window either way
    assert abs(hf[2] - at_64[2]) > 1e-3                             # the long one: the longer context counts


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
