"""lm-evaluation-harness adapter: ``lm_eval`` evaluates this repository's checkpoints.

Importing this module registers the model name ``grape`` with the real ``lm_eval`` package
(a dependency, not a copy), so that

    python lm-evaluation-harness/lm_eval_grape.py --model grape \
        --model_args pretrained=out-shakespeare --tasks arc_easy --batch_size 16

or, from Python, ``lm_eval.simple_evaluate(model="grape", model_args="pretrained=...")``
works. ``pretrained`` is anything ``training.checkpoint.load_model`` reads: a ``save_pretrained`` folder, a training
out_dir holding ``ckpt.pt``, or the ``ckpt.pt`` file itself.

Batching follows lm_eval's own HF model: requests sorted by length (longest first),
right-padded into one batch. The model is causal and has no attention mask, so right
padding is exact as long as logits are read only at real positions, which is what we do.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import lm_eval.models  # noqa: E402,F401  (registers lm_eval's own models before ours, see get_model)
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,  # noqa: E402
                                  postprocess_generated_text)

from model import GPT  # noqa: E402
from training.checkpoint import load_model  # noqa: E402
from training.progress import on_terminal, progress_bar  # noqa: E402
from training.tokenizer import EOT, gpt2_encoding  # noqa: E402

log = logging.getLogger(__name__)

N_REAL_TOKENS = 50257   # GPT-2's vocabulary; ids above are padding rows of the embedding
AUTO_BATCH_SIZE = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


@register_model("grape")
class GrapeLM(TemplateLM):
    """A GRAPE checkpoint behind lm_eval's three request types.

    model_args: pretrained (required), device, batch_size, dtype (float32 | bfloat16 | float16,
    autocast on CUDA), max_length (default: the checkpoint's block_size), block_size (load with
    a longer context; the encodings have no learned absolute positions), max_gen_toks,
    use_cache (KV-cache while generating, default True), trust_checkpoint_pickle (read a
    ``ckpt.pt`` of an earlier version with the full unpickler, which can run code it carries).
    """

    def __init__(self, pretrained: str | GPT, device: Optional[str] = None, batch_size=1,
                 max_batch_size: Optional[int] = None, dtype: str = "float32",
                 max_length: Optional[int] = None, block_size: Optional[int] = None,
                 max_gen_toks: int = 256, use_cache=True, trust_checkpoint_pickle=False, **unused):
        super().__init__()
        if unused:
            log.warning("grape: ignoring unknown model_args %s", sorted(unused))
        if device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's CLI passes --device cuda by default; run on the CPU rather than fail
            log.warning(f"device {device!r} requested but CUDA is not available: using cpu")
            device = "cpu"
        self._device = torch.device(device)
        if isinstance(pretrained, GPT):
            model = pretrained
        else:
            overrides = {"block_size": int(block_size)} if block_size else {}
            model = load_model(str(pretrained), trust_pickle=_as_bool(trust_checkpoint_pickle), **overrides)
        self.model = model.to(self._device).eval()
        if dtype not in DTYPES:
            raise ValueError(f"grape: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype]
        self._max_length = int(max_length) if max_length else self.model.config.block_size
        if self._max_length > self.model.config.block_size:
            raise ValueError(f"grape: max_length={self._max_length} exceeds the model's block_size="
                             f"{self.model.config.block_size}; pass block_size=... to load it longer")
        self._max_gen_toks = int(max_gen_toks)
        self.use_cache = _as_bool(use_cache)
        self.batch_size_per_gpu = self._parse_batch_size(batch_size, max_batch_size)
        self.enc = gpt2_encoding()

    @staticmethod
    def _parse_batch_size(batch_size, max_batch_size) -> int:
        # No automatic search: lm_eval's "auto" probes by running out of memory, which we avoid.
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            n = int(max_batch_size) if max_batch_size else AUTO_BATCH_SIZE
            log.warning("grape: batch_size=%s is not searched; using %d", batch_size, n)
            return n
        n = int(batch_size) if batch_size is not None else 1
        if n < 1:
            raise ValueError(f"grape: batch_size must be >= 1, got {batch_size!r}")
        return n

    # -- what TemplateLM needs ----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return EOT

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.enc.encode(string, allowed_special="all")

    def tok_decode(self, tokens) -> str:
        return self.enc.decode([t for t in tokens if t < N_REAL_TOKENS])

    @torch.no_grad()
    def _logits(self, idx: torch.Tensor, caches=None) -> torch.Tensor:
        use_amp = self._device.type == "cuda" and self.dtype != torch.float32
        with torch.autocast(self._device.type, dtype=self.dtype, enabled=use_amp):
            logits, _ = self.model(idx, caches=caches)
        return logits.float()

    # -- loglikelihood ------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # lm_eval's own "Tokenizing inputs" bar as well: none when stderr is not a terminal
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not on_terminal())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation) or None, context_enc, continuation_enc)."""

        def longest_first(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        # one-token continuations of the same context share one forward pass (group_by)
        ordered = Collator(requests, sort_fn=longest_first, group_by="contexts",
                           group_fn=lambda req: req[-2] + req[-1][:-1])
        results = []
        bar = progress_bar(total=len(requests), enabled=not disable_tqdm, desc="grape loglikelihood")
        for chunk in ordered.get_batched(n=self.batch_size_per_gpu):
            rows, lengths = [], []
            for _, ctx, cont in chunk:
                if not cont:
                    raise ValueError("grape: empty continuation in a loglikelihood request")
                # the model reads ctx+cont minus the last token; cut from the left if too long
                inp = (ctx + cont)[-(self.max_length + 1):][:-1]
                rows.append(inp)
                lengths.append(len(inp))
            width = max(lengths)
            batch = torch.zeros(len(rows), width, dtype=torch.long)
            for i, inp in enumerate(rows):
                batch[i, :len(inp)] = torch.tensor(inp)
            logits = self._logits(batch.to(self._device))
            for (request, ctx, cont), row_logits, n in zip(chunk, logits, lengths):
                # positions n-len(cont) .. n-1 predict the continuation; the padding after n is never read
                logprobs = F.log_softmax(row_logits[n - len(cont):n], dim=-1).unsqueeze(0)
                greedy = logprobs.argmax(dim=-1)
                for req_str, cont_toks, lp in ordered.get_cache(req_str=request, cxt_toks=ctx,
                                                                cont_toks=cont, logits=logprobs):
                    target = torch.tensor(cont_toks, device=lp.device).unsqueeze(0)
                    is_greedy = bool((greedy[:, -target.shape[1]:] == target).all())
                    lp = lp[:, -target.shape[1]:]
                    answer = (float(lp.gather(2, target.unsqueeze(-1)).sum()), is_greedy)
                    results.append(answer)
                    if req_str is not None:
                        self.cache_hook.add_partial("loglikelihood", req_str, answer)
                    bar.update(1)
        bar.close()
        return ordered.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in windows of max_length, each token predicted once."""
        windows, owner = [], []
        for i, (string,) in enumerate([req.args for req in requests]):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        ordered = Collator([req.args for req in requests],
                           sort_fn=lambda req: (-len(self.tok_encode(req[0])), req[0]),
                           group_by="gen_kwargs", group_fn=lambda req: req[1])
        results = []
        bar = progress_bar(total=len(requests), enabled=not disable_tqdm, desc="grape generate_until")
        eos = self.enc.decode([EOT])
        for chunk in ordered.get_batched(n=self.batch_size_per_gpu):
            contexts, all_kwargs = zip(*chunk)
            kwargs = dict(normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"grape: max_gen_toks={max_new} must be below max_length={self.max_length}")
            prompts = [self.tok_encode(c)[-(self.max_length - max_new):] or [EOT] for c in contexts]
            for context, new_tokens in zip(contexts, self._generate(prompts, max_new, until, kwargs)):
                text = postprocess_generated_text(self.tok_decode(new_tokens), stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                bar.update(1)
        bar.close()
        return ordered.get_original(results)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str], kwargs: dict):
        """Batched decoding of prompts of different lengths, exactly, without a mask.

        All rows advance one position per step. The shared prefix (the shortest prompt) is
        read in one pass; after that, a row still inside its prompt is fed its own next
        prompt token, the others their last sampled token. Every row therefore only ever
        sees its own real tokens, and the KV-cache stays one rectangle.
        """
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
        top_k = kwargs.pop("top_k", None)
        if kwargs:
            log.warning("grape: ignoring generation kwargs %s", sorted(kwargs))
        B = len(prompts)
        lengths = [len(p) for p in prompts]
        start = min(lengths)
        seqs = [list(p) for p in prompts]
        done = [False] * B
        n_new = [0] * B
        caches = self.model.new_caches() if self.use_cache else None
        pos = start        # tokens 0..pos-1 of every row have been decided
        fed = 0            # with a cache: how many positions the model has already read
        while not all(done) and pos < max(lengths) + max_new:
            if caches is not None:
                idx = torch.tensor([s[fed:pos] for s in seqs], device=self._device)
                fed = pos
            else:
                idx = torch.tensor([s[:pos] for s in seqs], device=self._device)
            logits = self._logits(idx, caches)[:, -1, :N_REAL_TOKENS]
            if do_sample:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, int(top_k), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1).squeeze(1)
            else:
                nxt = logits.argmax(dim=-1)
            for i in range(B):
                if pos < lengths[i]:
                    continue            # row i still reads its prompt; seqs[i][pos] is already set
                if done[i]:
                    seqs[i].append(EOT)  # filler so the batch stays rectangular; never returned
                    continue
                seqs[i].append(int(nxt[i]))
                n_new[i] += 1
                text = self.tok_decode(seqs[i][lengths[i]:])
                if n_new[i] >= max_new or any(s in text for s in until if s):
                    done[i] = True
            pos += 1
        return [s[n:n + k] for s, n, k in zip(seqs, lengths, n_new)]
