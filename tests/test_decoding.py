"""Streaming decoding equals the full forward pass, for every encoding.

The reference is always the model run without a cache on the whole sequence (full
recomputation); the code under test is the cache path (prefill, chunks, single steps), the
sampling loop and transformers' ``generate()``.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from modeling.generation import StreamingCache
from grape import ENCODINGS, GRID_ENCODINGS
from model import GPT, GPTConfig

V, BLOCK = 64, 24


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of tiny forwards: threads only add overhead (and the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# every encoding, plus the options that change what is cached
VARIANTS = [(name, {}) for name in sorted(ENCODINGS)] + [
    ("grape_m", {"grape_m_per_head": True}),
    ("grape_m_ctx", {"grape_ctx_per_head": True}),
    ("grape_ap", {"p_tie_mode": "pq"}),
    ("grape_ap", {"p_tie_mode": "pk"}),
    ("grape_ap", {"p_tie_mode": "pv"}),
    ("rope", {"using_groupnorm": True, "use_qk_rmsnorm": False}),
    ("grape_m_basis", {"grape_basis_shared": True, "grape_m_per_head": True}),
    ("grape_m_planes", {"grape_planes_depth": 2}),
    ("grape_a_phase", {"grape_ctx_per_head": True}),
    ("grape_a_grid", {"grid_distance": "signed"}),
    ("grape_a_grid", {"grid_distance": "radial", "grid": (2, 3, 4)}),
    ("grape_m_grid", {"grid": (2, 3, 4)}),
]
SHIFTS = {"noshift": {}, "kvshift": {"use_k_shift": True, "use_v_shift": True}}


def _composition_supported():
    try:
        GPTConfig(n_head=2, n_embd=16, pos_encoding="rope+fox")
        return True
    except ValueError:
        return False


if _composition_supported():        # multiplicative + additive in one head (SPEC §6)
    VARIANTS += [("grape_m_ctx+fox", {}), ("rope+grape_ap", {}), ("grape_m+grape_a_qk", {}),
                 ("grape_m_grid+grape_a_grid", {}), ("grape_m_ctx_dict+grape_a_phase", {})]


def variant_id(v):
    name, kw = v
    return "-".join([name] + [f"{k}={x}" for k, x in kw.items()])


def make_model(pos_encoding, seed=0, **kw) -> GPT:
    """A tiny model whose parameters are all perturbed, so that every gate, phase and probe
    depends on the token (the encodings' inits make several of them constant)."""
    torch.manual_seed(seed)
    if any(part in GRID_ENCODINGS for part in pos_encoding.split("+")):
        kw.setdefault("grid", (4, 6))              # BLOCK tokens in raster order
    cfg = GPTConfig(n_layer=2, n_head=3, head_dim=8, n_embd=24, vocab_size=V, block_size=BLOCK,
                    pos_encoding=pos_encoding, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
            if "phase_proj.weight" in name:     # ω_t = g(w·x + b): make w matter
                p.normal_(0.0, 4.0)
    return model


def tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def cached_logits(model, idx, schedule):
    """Feed idx through one cache in the chunk sizes of ``schedule``; logits of every position."""
    caches, out, t = model.new_caches(), [], 0
    for n in schedule:
        logits, _ = model(idx[:, t:t + n], caches=caches)
        out.append(logits)
        t += n
    assert t == idx.shape[1]
    return torch.cat(out, dim=1), caches


# ----------------------------------------------------------------------------------------
# logits: prefill + steps == full forward
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", SHIFTS, ids=list(SHIFTS))
@pytest.mark.parametrize("variant", VARIANTS, ids=[variant_id(v) for v in VARIANTS])
def test_cached_decoding_matches_full_forward_at_every_position(variant, shift):
    name, kw = variant
    T = 12
    idx = tokens(2, T)
    model = make_model(name, **kw, **SHIFTS[shift])
    with torch.no_grad():
        full, _ = model(idx)
        schedules = {
            "prefill+steps": [6] + [1] * (T - 6),
            "two-chunk prefill+steps": [4, 5] + [1] * (T - 9),
            "steps from the first token": [1] * T,
        }
        for label, schedule in schedules.items():
            got, caches = cached_logits(model, idx, schedule)
            torch.testing.assert_close(got, full, rtol=1e-5, atol=2e-5, msg=lambda m: f"{label}: {m}")
            assert all(c.length == T for c in caches)


@pytest.mark.parametrize("shift", SHIFTS, ids=list(SHIFTS))
@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_cache_holds_per_token_state_only(name, shift):
    """What the paper says is needed: per key position a fixed-size state (rotated key, value,
    key gate, log-forget prefix sum, rotated probe) and O(1) running state; never T x T."""
    model = make_model(name, **SHIFTS[shift])
    B, T = 2, 10
    with torch.no_grad():
        _, caches = cached_logits(model, tokens(B, T), [7, 1, 1, 1])
    H, D = model.config.n_head, model.config.head_dim
    per_token = {"k": D, "v": D, "fox_cum": 1, "grape_a_slope_k": 1, "grape_ap_r": model.config.p_head_dim,
                 "grape_a_phase_cum": 1, "grape_a_dict_slope_k": 1}
    running = {"phase_total", "k_shift_last", "v_shift_last", "grape_a_phase_total", "grape_ctx_dict_total"}
    expected = {"k", "v"}
    expected |= {"fox": {"fox_cum"}, "grape_a_k": {"grape_a_slope_k"}, "grape_a_qk": {"grape_a_slope_k"},
                 "grape_ap": {"grape_ap_r"}, "grape_m_ctx": {"phase_total"},
                 "grape_a_phase": {"grape_a_phase_cum", "grape_a_phase_total"},
                 "grape_m_ctx_dict": {"grape_ctx_dict_total"}, "grape_a_dict": {"grape_a_dict_slope_k"}}.get(name, set())
    expected |= {"k_shift_last", "v_shift_last"} if shift == "kvshift" else set()
    for cache in caches:
        assert set(cache.tensors) == expected
        for key, t in cache.tensors.items():
            if key in running:
                assert t.shape[0] == B and t.shape[2] == 1
            else:
                assert t.numel() == B * H * T * per_token[key], (key, t.shape)


# ----------------------------------------------------------------------------------------
# GPT.generate (nanoGPT loop) == decoding by full recomputation
# ----------------------------------------------------------------------------------------

def recompute_decode(model, idx, n, pick):
    """The obvious loop: run the whole sequence through the model for every new token."""
    seq = idx
    for _ in range(n):
        logits, _ = model(seq)
        seq = torch.cat([seq, pick(logits[:, -1])], dim=1)
    return seq


def greedy(logits):
    return logits.argmax(-1, keepdim=True)


@pytest.mark.parametrize("shift", SHIFTS, ids=list(SHIFTS))
@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_greedy_generate_equals_greedy_recomputation(name, shift):
    model = make_model(name, **SHIFTS[shift])
    idx = tokens(2, 5, seed=3)
    with torch.no_grad():
        expected = recompute_decode(model, idx, 12, greedy)
    got = model.generate(idx, 12, temperature=0.0)
    assert torch.equal(got, expected)


def test_sampling_generate_equals_sampling_by_recomputation():
    """Same random stream, temperature and top-k: the cached loop draws the same tokens."""
    model = make_model("grape_ap", use_k_shift=True)
    idx = tokens(3, 4, seed=5)
    temperature, top_k = 0.7, 10

    def pick(logits):
        logits = logits / temperature
        kth = logits.sort(dim=-1, descending=True).values[:, top_k - 1:top_k]
        probs = F.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        return torch.multinomial(probs, 1)

    torch.manual_seed(123)
    with torch.no_grad():
        expected = recompute_decode(model, idx, 10, pick)
    torch.manual_seed(123)
    got = model.generate(idx, 10, temperature=temperature, top_k=top_k)
    assert torch.equal(got, expected)
    assert (got[:, 4:] != got[:1, 4:]).any()      # the rows really were sampled independently


def test_generate_stops_with_clear_error_past_block_size():
    model = make_model("fox", use_k_shift=True)
    idx = tokens(1, 10)
    # p + n - 1 tokens are fed: exactly block_size is fine
    assert model.generate(idx, BLOCK - 10 + 1, temperature=0).shape == (1, BLOCK + 1)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(idx, BLOCK - 10 + 2, temperature=0)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(tokens(1, BLOCK + 1), 1)
    caches = model.new_caches()                    # and a hand-driven cache stops too
    with torch.no_grad():
        model(tokens(1, BLOCK), caches=caches)
        with pytest.raises(ValueError, match="block_size"):
            model(tokens(1, 1), caches=caches)


# ----------------------------------------------------------------------------------------
# transformers' generate() on the PreTrainedModel
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rope", "grape_m_ctx", "fox", "grape_a_qk", "grape_ap"])
def test_transformers_greedy_generate_equals_recomputation(name):
    model = make_model(name, use_k_shift=True, use_v_shift=True)
    idx = tokens(2, 5, seed=7)
    with torch.no_grad():
        expected = recompute_decode(model, idx, 8, greedy)
    got = model.generate(input_ids=idx, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)
    no_cache = model.generate(input_ids=idx, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(no_cache, expected)


def test_transformers_sampling_with_cache_equals_without():
    model = make_model("grape_ap", use_v_shift=True)
    idx = tokens(2, 5, seed=8)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(model.generate(input_ids=idx, max_new_tokens=10, do_sample=True, top_k=20,
                                   temperature=0.9, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])


def test_transformers_beam_search_reorders_the_cache():
    """Beam search reorders cache rows every step (LayerCache.reorder); with the cache it must
    find the same beams as without one."""
    model = make_model("grape_m_ctx", use_k_shift=True, use_v_shift=True, grape_ctx_per_head=True)
    idx = tokens(2, 4, seed=9)
    kw = dict(input_ids=idx, max_new_tokens=8, num_beams=3, do_sample=False, num_return_sequences=3)
    cached = model.generate(**kw)
    recomputed = model.generate(**kw, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_transformers_forward_returns_output_and_cache_continues():
    model = make_model("fox", use_k_shift=True)
    idx = tokens(2, 9)
    with torch.no_grad():
        full, loss = model(idx, idx)                       # nanoGPT call: still a tuple
        assert loss is not None and full.shape == (2, 9, V)
        first = model(input_ids=idx[:, :6], use_cache=True)
        assert isinstance(first.past_key_values, StreamingCache)
        assert first.past_key_values.get_seq_length() == 6
        rest = model(input_ids=idx[:, 6:], past_key_values=first.past_key_values, return_dict=True)
        last = model(input_ids=idx[:, 6:], past_key_values=StreamingCache(cached_logits(model, idx[:, :6], [6])[1]),
                     logits_to_keep=1)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(last.logits, full[:, -1:], rtol=1e-5, atol=2e-5)


def test_transformers_generate_rejects_what_it_cannot_do_exactly():
    model = make_model("rope")
    idx = tokens(2, 5)
    mask = torch.ones_like(idx)
    mask[0, 2] = 0                                              # a pad between real tokens
    with pytest.raises(ValueError, match="pad between two real tokens"):
        model.generate(input_ids=idx, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(input_ids=idx, max_new_tokens=BLOCK)
    from transformers import DynamicCache
    with pytest.raises(TypeError, match="StreamingCache"):
        model(input_ids=idx, past_key_values=DynamicCache())
    with pytest.raises(NotImplementedError, match="cropped"):
        StreamingCache(model.new_caches()).crop(3)


# ----------------------------------------------------------------------------------------
# sample.py
# ----------------------------------------------------------------------------------------

def test_sample_script_prints_text_from_both_checkpoint_formats(tmp_path, capsys, monkeypatch):
    from scripts import sample
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, pos_encoding="grape_ap")
    model = GPT(cfg)
    model.save_pretrained(tmp_path / "hf")
    torch.save({"model": model.state_dict(), "model_config": cfg.to_dict()}, tmp_path / "ckpt.pt")
    outputs = {}
    for label, args in {"ckpt": ["--out_dir", str(tmp_path)], "hf": ["--ckpt", str(tmp_path / "hf")]}.items():
        outputs[label] = sample.main(args + ["--start=Hello world", "--num_samples=2", "--max_new_tokens=8",
                                             "--seed=1"])
    printed = capsys.readouterr().out
    for texts in outputs.values():
        assert len(texts) == 2 and all(t.startswith("Hello world") and len(t) > len("Hello world") for t in texts)
    assert outputs["ckpt"] == outputs["hf"]             # same weights, same seed: same text
    assert outputs["ckpt"][0] in printed
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sample.main(["--out_dir", str(tmp_path / "missing")])
    # no arguments: the newest out*/ checkpoint in the working folder, as pretrain.sh leaves it
    (tmp_path / "run" / "out-older").mkdir(parents=True)
    (tmp_path / "run" / "out-newer").mkdir()
    other = GPT(cfg)                                    # different weights, older file
    torch.save({"model": other.state_dict(), "model_config": cfg.to_dict()}, tmp_path / "run" / "out-older" / "ckpt.pt")
    os.utime(tmp_path / "run" / "out-older" / "ckpt.pt", (1, 1))
    os.replace(tmp_path / "ckpt.pt", tmp_path / "run" / "out-newer" / "ckpt.pt")
    monkeypatch.chdir(tmp_path / "run")
    assert sample.main(["--start=Hello world", "--num_samples=2", "--max_new_tokens=8", "--seed=1"]) == outputs["ckpt"]


# ----------------------------------------------------------------------------------------
# Threads while decoding
# ----------------------------------------------------------------------------------------

def threads_seen_by_forward(model):
    """Records torch.get_num_threads() at every forward of the model's first block."""
    seen = []
    model.transformer.h[0].register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    return seen


def test_generate_decodes_small_models_on_one_thread_and_restores_the_callers_count():
    from modeling import generation
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=V, block_size=BLOCK, pos_encoding="rope"))
    idx = torch.randint(0, V, (1, 5))
    assert 2 * sum(p.numel() for p in model.parameters()) < generation.PARALLEL_STEP_FLOPS
    torch.set_num_threads(2)                # the caller's choice (the module fixture set 1)
    try:
        seen = threads_seen_by_forward(model)
        model.generate(idx, 4, temperature=0)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        seen.clear()
        model.generate(idx, 4, temperature=0, threads=2)          # an explicit count wins
        assert set(seen) == {2} and torch.get_num_threads() == 2
        seen.clear()
        model.generate(input_ids=idx, max_new_tokens=3, do_sample=False)   # transformers' generate too
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_decoding_threads_follow_step_size_and_load(monkeypatch):
    from modeling import generation
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=V, block_size=BLOCK, pos_encoding="rope"))
    flops = 2 * sum(p.numel() for p in model.parameters())
    torch.set_num_threads(2)
    try:
        assert generation.decoding_threads(model, batch=1) == 1
        monkeypatch.setattr(generation, "PARALLEL_STEP_FLOPS", flops * 4)          # a batch of 4 is "large"
        monkeypatch.setattr(generation.os, "cpu_count", lambda: 4)
        monkeypatch.setattr(generation.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
        assert generation.decoding_threads(model, batch=2) == 1
        assert generation.decoding_threads(model, batch=4) == 2      # idle machine: torch's count
        monkeypatch.setattr(generation.os, "getloadavg", lambda: (3.4, 0.0, 0.0))
        assert generation.decoding_threads(model, batch=4) == 1      # three of four cores busy
    finally:
        torch.set_num_threads(1)


def test_sample_script_takes_a_thread_count(tmp_path, monkeypatch):
    from scripts import sample
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, pos_encoding="rope")
    torch.save({"model": GPT(cfg).state_dict(), "model_config": cfg.to_dict()}, tmp_path / "ckpt.pt")
    seen = []
    real = GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, *a, **kw: seen.append(kw.get("threads")) or real(self, *a, **kw))
    sample.main(["--out_dir", str(tmp_path), "--num_samples=1", "--max_new_tokens=3", "--threads=2"])
    assert seen == [2] and torch.get_num_threads() == 1
    with pytest.raises(SystemExit):
        sample.parse_args(["--threads=-1"])
