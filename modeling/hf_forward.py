"""The model called the transformers way: the arguments transformers' tools pass, the loss they
expect, the outputs they read, and weight files read without running code.

``generate()``, ``pipeline``, ``Trainer``, PEFT and lm_eval call ``model(input_ids=...,
attention_mask=..., labels=..., ...)``. Following transformers' conventions, the forward
accepts what it does not use and ignores it (``cache_position``, ``output_attentions``,
``token_type_ids`` ... of one release or another), so a folder written today keeps working
when transformers adds an argument. The decoding cache arrives as ``past_key_values`` (up to
transformers 5.23) or ``cache`` (5.24 on), and goes back out under the name the installed
release's output classes use.

- ``labels``: transformers' causal-LM loss: logits at t predict labels at t + 1, labels -100
  are ignored, and with ``num_items_in_batch`` (Trainer's gradient accumulation) the summed
  loss is divided by it instead of averaged.
- ``attention_mask`` / ``position_ids``: padded batches (``padding.Layout``).
- ``output_hidden_states``: the embedding output and every block's output, the last one after
  the final norm (transformers' convention).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .generation import StreamingCache, check_length
from .padding import Layout

IGNORE_INDEX = -100          # transformers' label for "no loss here"


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch=None) -> Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + 1] over labels != -100; with
    ``num_items_in_batch``, the sum divided by it."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def take_cache(model, past_key_values, cache, use_cache: Optional[bool]) -> Optional[StreamingCache]:
    """The decoding cache under either name; a new one when transformers asks for one."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache once, as past_key_values or as cache")
    found = cache if cache is not None else past_key_values
    if found is not None and not isinstance(found, StreamingCache):
        raise TypeError(f"the cache must be this model's StreamingCache (it holds more than keys and values), got "
                        f"{type(found).__name__}; let generate() make it, or pass the one a previous call returned")
    if found is None and use_cache:              # generate() asks; a plain forward call keeps none
        found = StreamingCache(model.new_caches())
    return found


def output(cls, cache: Optional[StreamingCache], return_dict: Optional[bool], **fields):
    """``cls(**fields)`` with the cache under the field name this transformers release uses
    (``past_key_values`` up to 5.23, ``cache`` from 5.24); a tuple when ``return_dict=False``."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields["cache" if "cache" in names else "past_key_values"] = cache
    out = cls(**fields)
    return out if return_dict is not False else out.to_tuple()


def hidden_run(base, input_ids: Optional[Tensor], attention_mask, position_ids, past_key_values, cache, use_cache,
               output_hidden_states, coords, unused: dict):
    """Run the base transformer the transformers way: (final hidden states, cache, hidden states)."""
    if unused.get("inputs_embeds") is not None:
        raise ValueError("inputs_embeds is not supported by this model: pass input_ids")
    if input_ids is None:
        raise ValueError("pass input_ids")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    found = take_cache(base, past_key_values, cache, use_cache)
    caches = found.layers if found is not None else None
    n_cached = caches[0].length if caches is not None else 0
    B, T = input_ids.shape
    layout = Layout.of(attention_mask, position_ids, n_cached, T, B)
    check_length(base.config, (layout.last_position(n_cached, T) if layout is not None else n_cached + T - 1) + 1)
    if coords is not None and base.config.grid is None:
        raise ValueError("coords are token coordinates for the grid encodings; this model has no grid")
    states = [] if output_hidden_states else None
    hidden = base.run(input_ids, caches, coords, layout, states)
    return hidden, found, tuple(states) if states is not None else None


def base_forward(base, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                 use_cache=None, output_hidden_states=None, return_dict=None, coords=None, **unused):
    """``GPTModel(input_ids=...)`` -> ``BaseModelOutputWithPast`` (last_hidden_state after the final norm)."""
    hidden, found, states = hidden_run(base, input_ids, attention_mask, position_ids, past_key_values, cache,
                                       use_cache, output_hidden_states, coords, unused)
    return output(BaseModelOutputWithPast, found, return_dict, last_hidden_state=hidden, hidden_states=states)


def causal_lm_forward(model, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                      past_key_values=None, cache=None, use_cache=None, output_hidden_states=None, return_dict=None,
                      logits_to_keep: int = 0, coords=None, num_items_in_batch=None, **unused):
    """``GPT(input_ids=..., labels=...)`` -> ``CausalLMOutputWithPast`` (loss when labels are given)."""
    hidden, found, states = hidden_run(model.transformer, input_ids, attention_mask, position_ids, past_key_values,
                                       cache, use_cache, output_hidden_states, coords, unused)
    if logits_to_keep:
        if labels is not None:
            raise ValueError("logits_to_keep and labels cannot be combined (the loss needs every logit)")
        hidden = hidden[:, -logits_to_keep:]
    logits = model.lm_head(hidden).float()
    loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
    return output(CausalLMOutputWithPast, found, return_dict, loss=loss, logits=logits, hidden_states=states)


# ----------------------------------------------------------------------------------------
# Weight files, read without running code
# ----------------------------------------------------------------------------------------

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class UnsafeWeights(ValueError):
    """A weight file that would run code when loaded, or an index that points outside its folder."""


def shard_path(folder: str, index: str, name: str) -> str:
    """The file an index names, which must lie inside the folder (no absolute path, no '..', no
    symlink out of it)."""
    path = os.path.realpath(os.path.join(folder, name))
    inside = os.path.realpath(folder) + os.sep
    if os.path.isabs(name) or not path.startswith(inside):
        raise UnsafeWeights(f"{os.path.join(folder, index)} names {name!r}, a file outside its folder; refusing to "
                            "read it")
    return path


def refused_global(error: Exception) -> Optional[str]:
    """The pickle global ``torch.load(weights_only=True)`` refused to call, from its error
    (None when the error is something else, e.g. a damaged file)."""
    text = str(error)
    if "weights only load failed" not in text.lower() and "unsupported global" not in text.lower():
        return None
    for line in text.splitlines():
        if "GLOBAL " in line:
            return line.split("GLOBAL ", 1)[1].split()[0]
    return "?"


def read_tensor_file(path: str, check_only: bool = False) -> dict[str, Tensor]:
    """A safetensors file, or a torch pickle read with ``weights_only=True`` (tensors and plain
    containers only: nothing in it is executed)."""
    if path.endswith(".safetensors"):
        if check_only:
            return {}
        from safetensors.torch import load_file
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:                            # pickle.UnpicklingError and what torch wraps it in
        refused = refused_global(e)
        if refused is not None:
            raise UnsafeWeights(f"{path} holds Python objects that loading would run (pickle global {refused}); "
                                "refusing to load it. Weights are tensors: save them with safetensors") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnsafeWeights(f"{path} is not a readable weight file: {first[:200]}") from None
    if not isinstance(state, dict):
        raise UnsafeWeights(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    return state


def read_weights(path: str, check_only: bool = False) -> dict[str, Tensor]:
    """The tensors of a save_pretrained folder: model.safetensors or pytorch_model.bin, sharded or
    not, read safely (``read_tensor_file``; an index may name only files in the folder).
    ``check_only``: run the checks (a pickle is read, safetensors are not) and return {}."""
    for index in WEIGHT_INDEXES:
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map") or {}
            shards = [shard_path(path, index, name) for name in sorted(set(weight_map.values()))]
            state = {}
            for shard in shards:
                state.update(read_tensor_file(shard, check_only))
            return state
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return read_tensor_file(os.path.join(path, name), check_only)
    if check_only:
        return {}
    raise FileNotFoundError(f"no weights in {path} (expected model.safetensors or pytorch_model.bin)")
