"""Padded batches (modeling/padding.py): every prompt of a padded batch gets the logits and the
greedy continuation it gets alone, for every encoding of grape.ENCODINGS, with KV-shift, at
lengths where the fast attention paths run (T >= 256); the fast paths mask pad keys as the dense
reference does, without building a (B, H, T, T) tensor; and, in a process that cannot import this
repository, transformers' pipeline and lm_eval's generate_until batch prompts of different lengths.

Every expectation is computed independently: each prompt run alone, unpadded, and its greedy
continuation by recomputing the whole sequence for every new token (no cache, no padding)."""
import json

import pytest
import torch

from grape import ENCODINGS, GRID_ENCODINGS
from model import EOT, GPT, GPTConfig
from modeling import chunked
from modeling.attention import attend, dense_attention
from modeling.padding import Layout
from perturbation import perturb_parameters
from test_attention_backends import ADDITIVE, MaxNumel, inputs, make_encoding
from training.tokenizer import gpt2_encoding

LENGTHS = (300, 263, 281)            # T >= 256: the CPU's fast paths; a different number of pads per row
NEW = 4
V = 1024                             # a small vocabulary keeps the many forwards cheap
EOS = V - 1
VARIANTS = {name: dict(pos_encoding=name) for name in sorted(ENCODINGS)}
VARIANTS["grape_ap_kvshift"] = dict(pos_encoding="grape_ap", use_k_shift=True, use_v_shift=True)
VARIANTS["rope_kvshift"] = dict(pos_encoding="rope", use_k_shift=True, use_v_shift=True)
VARIANTS["rope+grape_ap"] = dict(pos_encoding="rope+grape_ap")


def tiny(settings: dict, seed: int = 0, block_size: int = 512, vocab_size: int = V) -> GPT:
    torch.manual_seed(seed)
    grid = (32, 32) if settings["pos_encoding"] in GRID_ENCODINGS else None
    eos = EOS if vocab_size == V else EOT
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, grid=grid, vocab_size=vocab_size,
                          bos_token_id=eos, eos_token_id=eos, **settings)).eval()
    return perturb_parameters(model, 0.05)


def prompts(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, EOS, (n,), generator=g).tolist() for n in lengths]


def padded(rows: list[list[int]], side: str = "left", pad: int = EOS) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (pads hold the eos token, as the folder's tokenizer pads) and attention_mask."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


def greedy_alone(model: GPT, prompt: list[int], n: int) -> list[int]:
    """The prompt alone, the whole sequence recomputed for each new token (no cache)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]), logits_to_keep=1).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def until_eos(tokens: list[int], eos: int = EOS) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("name", list(VARIANTS))
def test_padded_batch_gives_each_prompt_its_own_logits_and_greedy_continuation(name):
    model, rows = tiny(VARIANTS[name]), prompts(LENGTHS)
    with torch.no_grad():
        alone = [model(torch.tensor([row])).logits[0] for row in rows]
        for side in ("left", "right"):          # left: generation; right: training batches
            ids, mask = padded(rows, side)
            logits = model(input_ids=ids, attention_mask=mask).logits
            for i, row in enumerate(rows):
                real = slice(ids.shape[1] - len(row), None) if side == "left" else slice(0, len(row))
                torch.testing.assert_close(logits[i, real], alone[i], atol=5e-5, rtol=1e-4, msg=f"{side} row {i}")
    ids, mask = padded(rows)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=EOS)
    for i, row in enumerate(rows):
        assert until_eos(out[i, ids.shape[1]:].tolist()) == until_eos(greedy_alone(model, row, NEW)), f"row {i}"


def key_padding_for(lengths, T) -> torch.Tensor:
    """(B, T): True at the first T - n keys of a row holding n real tokens (left padding)."""
    return torch.stack([torch.arange(T) < T - n for n in lengths])


@pytest.mark.parametrize("name", [None, *ADDITIVE])
def test_fast_paths_mask_pad_keys_as_the_dense_reference_does(name, monkeypatch):
    """attend(..., key_padding) on the path auto picks at T >= 256 (chunked for a bias, SDPA
    without one) against dense_attention with its explicit (B, H, T, T) mask, on the real
    queries, values and gradients; and no op of the fast path makes a tensor of T² entries
    (the tiled path's tiles capped well below it, as at long T)."""
    B, H, T, D = 3, 3, 300, 8
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", B * H * T * T // 16)
    x, q, k, v = inputs(B, H, T, D, C=24)
    key_padding = key_padding_for(LENGTHS, T)
    real = ~key_padding
    results = {}
    for backend in ("auto", "dense"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, q, k, v)]
        xx, qq, kk, vv = leaves
        enc = make_encoding(name) if name else None
        qe, ke, bias = enc(xx, qq, kk, vv) if enc else (qq, kk, None)
        with MaxNumel() as mode:
            out = attend(qe, ke, vv, bias, backend, key_padding)
            (out * real[:, None, :, None]).square().sum().backward()       # real queries only
        if backend == "auto":
            assert mode.largest < B * H * T * T // 4, f"an op produced {mode.largest} elements"
        results[backend] = (out, [t.grad for t in leaves[1:]])
    (fast, fast_grads), (ref, ref_grads) = results["auto"], results["dense"]
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(fast[i, :, T - n:], ref[i, :, T - n:], atol=2e-5, rtol=1e-4)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-3)


def test_dense_reference_masks_pads_by_hand():
    """The dense reference itself, against softmax over each row's real keys written out."""
    B, H, T, D = 2, 2, 12, 4
    _, q, k, v = (t.detach() for t in inputs(B, H, T, D, C=8))
    lengths = (12, 7)
    out = dense_attention(q, k, v, None, key_padding_for(lengths, T))
    for i, n in enumerate(lengths):
        qs, ks, vs = q[i, :, T - n:], k[i, :, T - n:], v[i, :, T - n:]
        logits = qs @ ks.transpose(-1, -2) / D ** 0.5
        logits = logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
        torch.testing.assert_close(out[i, :, T - n:], torch.softmax(logits, -1) @ vs, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(out).all()                         # a pad query sees itself: no NaN


def test_masks_the_model_cannot_honour_are_refused_in_one_line():
    model = tiny(VARIANTS["fox"], block_size=64)
    ids = torch.randint(0, EOS, (2, 6))
    hole = torch.ones_like(ids)
    hole[0, 2] = 0
    with pytest.raises(ValueError, match="pad between two real tokens") as error:
        model(input_ids=ids, attention_mask=hole)
    assert "\n" not in str(error.value)
    right = torch.ones_like(ids)
    right[1, -2:] = 0                                        # right padding: fine for a forward ...
    model(input_ids=ids, attention_mask=right)
    with pytest.raises(ValueError, match="padding_side = 'left'"):   # ... but not for generation
        model.generate(input_ids=ids, attention_mask=right, max_new_tokens=2, do_sample=False, pad_token_id=EOS)
    with pytest.raises(ValueError, match="2-D"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 6, 6))


def test_layout_is_none_for_an_unpadded_batch_and_positions_count_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    layout = Layout.of(mask, None, 0, 5, 2)
    assert layout.positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert layout.real.tolist() == mask.bool().tolist()
    assert Layout.of(torch.ones(2, 5), None, 0, 5, 2) is None
    assert Layout.of(None, torch.arange(3, 5)[None], 3, 2, 2) is None        # what generate() passes unpadded
    decoding = Layout.of(torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), None, 5, 1, 2)
    assert decoding.positions.tolist() == [[3], [5]] and decoding.key_padding.shape == (2, 6)


# ----------------------------------------------------------------------------------------
# In a process that cannot import this repository: pipeline and lm_eval, batched
# ----------------------------------------------------------------------------------------

TEXTS = ["def f(x):", "The quick brown fox jumps over the lazy dog, and then", "import os\nprint(os.getcwd())"]
PIPELINE = r'''
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
spec = json.load(open(sys.argv[1]))
out = {}
for name, folder in spec["folders"].items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out[name] = [r[0]["generated_text"] for r in generator(spec["texts"], batch_size=3, max_new_tokens=spec["new"],
                                                             do_sample=False)]
json.dump(out, open(spec["out"], "w"))
'''

GENERATE_TASK = """task: grape_tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{text}}}}"
doc_to_target: ""
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {new}
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def batched_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("padded_folders")
    folders, models = {}, {}
    for name in ("grape_ap_kvshift", "fox", "grape_m_ctx"):
        models[name] = tiny(VARIANTS[name], seed=3, block_size=128, vocab_size=50304)
        folders[name] = str(root / name)
        models[name].save_pretrained(folders[name])
    return root, folders, models


def expected_texts(model, new: int) -> list[str]:
    enc = gpt2_encoding()
    return [text + enc.decode([t for t in until_eos(greedy_alone(model, enc.encode(text), new), EOT) if t != EOT])
            for text in TEXTS]


def test_pipeline_batches_prompts_of_different_lengths(batched_folders, run_without_repository):
    root, folders, models = batched_folders
    spec = {"folders": folders, "texts": TEXTS, "new": 5, "out": str(root / "pipeline.json")}
    (root / "pipeline_spec.json").write_text(json.dumps(spec))
    run_without_repository(PIPELINE, str(root / "pipeline_spec.json"))
    got = json.loads((root / "pipeline.json").read_text())
    for name, model in models.items():
        want = expected_texts(model, 5)
        assert all(len(w) > len(t) for w, t in zip(want, TEXTS)) and got[name] == want, name


def test_lm_eval_generate_until_batches_prompts_of_different_lengths(batched_folders, run_without_repository,
                                                                     tmp_path):
    from test_lm_eval_adapter import LM_EVAL_HF_CLI, read_results
    _, folders, models = batched_folders
    data = tmp_path / "generate.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "grape_tiny_generate.yaml").write_text(GENERATE_TASK.format(data=data, new=5))
    run_without_repository(LM_EVAL_HF_CLI, "--model", "hf", "--model_args",
                           f"pretrained={folders['grape_ap_kvshift']},trust_remote_code=True",
                           "--tasks", "grape_tiny_generate", "--include_path", str(tmp_path), "--batch_size", "3",
                           "--device", "cpu", "--output_path", str(tmp_path / "out"), "--log_samples")
    samples = read_results(str(tmp_path / "out"))[0]["grape_tiny_generate"]
    want = [full[len(text):].split("\n\n")[0] for text, full in zip(TEXTS, expected_texts(models["grape_ap_kvshift"], 5))]
    assert any(want) and len(samples) == len(TEXTS)
    assert [s["resps"][0][0] for s in samples] == [want[s["doc_id"]] for s in samples]
