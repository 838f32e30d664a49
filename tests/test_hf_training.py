"""The Hugging Face training stack on checkpoint folders (issue 20, point 3).

In a process that cannot import this repository: labels= gives transformers' causal-LM loss;
Trainer fine-tunes a folder end to end (with gradient checkpointing) and the result reloads with
equal logits; PEFT LoRA trains, saves, reloads and merges; resize_token_embeddings;
output_hidden_states; attn_implementation; AutoModel is the base transformer. Here: the loss
against a hand-written shifted cross-entropy, gradients with activation checkpointing against
plain backpropagation, hidden states against the blocks run by hand, position_ids against
explicit grid coordinates and the relative law."""
import json

import pytest
import torch
import torch.nn.functional as F

from model import EOT, GPT, GPTConfig
from modeling.padding import Layout
from perturbation import perturb_parameters
from test_training import data_dir, tiny as training_args  # noqa: F401  (data_dir: a fixture)
from train_adam_finewebedu import main as train


def tiny(seed=0, **settings) -> GPT:
    torch.manual_seed(seed)
    settings.setdefault("pos_encoding", "grape_ap")
    settings.setdefault("block_size", 512)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=1024, bos_token_id=1023,
                          eos_token_id=1023, **settings))
    return perturb_parameters(model, 0.05)


def shifted_cross_entropy(logits, labels, divide_by=None) -> torch.Tensor:
    """By hand: -log p(labels[t+1] | logits[t]) over the labels that are not -100."""
    logprobs = logits.double().log_softmax(-1)
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != -100:
                total -= float(logprobs[b, t, target])
                count += 1
    return torch.tensor(total / (divide_by if divide_by is not None else count), dtype=torch.float64)


def test_labels_give_transformers_causal_lm_loss():
    model = tiny().eval()
    ids = torch.randint(0, 1023, (3, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :7] = -100                       # a prompt not trained on
    labels[2, 30:] = -100                      # padding
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        summed = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(50))
    torch.testing.assert_close(out.loss.double(), shifted_cross_entropy(out.logits, labels), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(summed.loss.double(), shifted_cross_entropy(out.logits, labels, divide_by=50),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        model(inputs_embeds=torch.zeros(1, 3, 32))


@pytest.mark.parametrize("switch", ["training option", "transformers"])
def test_activation_checkpointing_gives_the_gradients_of_plain_backpropagation(switch):
    """At T >= 256 (the chunked GRAPE-AP path) with KV-shift: the same loss and gradients."""
    ids = torch.randint(0, 1023, (2, 260), generator=torch.Generator().manual_seed(2))
    grads = {}
    for checkpointed in (False, True):
        model = tiny(pos_encoding="grape_ap", use_k_shift=True, use_v_shift=True).train()
        if checkpointed and switch == "training option":
            model.set_activation_checkpointing(True)
        elif checkpointed:       # transformers' switch (renamed activation_checkpointing_enable in 5.23)
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        assert model.transformer.gradient_checkpointing == checkpointed
        loss = model(ids[:, :-1], ids[:, 1:])[1]
        loss.backward()
        grads[checkpointed] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=0, atol=0)
    for name, grad in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_training_option_activation_checkpointing_trains_the_same_run(data_dir, tmp_path):
    """--activation_checkpointing=True: the same validation loss and weights as without (CPU, float32)."""
    runs = {}
    for on in (False, True):
        out = str(tmp_path / f"run_{on}")
        result = train(training_args(data_dir, out, "--max_iters=3", "--eval_interval=3",
                                     f"--activation_checkpointing={on}"))
        assert result["model"].transformer.gradient_checkpointing == on
        runs[on] = (result["val_loss"], result["model"].state_dict())
    assert runs[True][0] == runs[False][0]
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=0, atol=0, msg=name)


def test_hidden_states_are_the_blocks_outputs():
    model = tiny(pos_encoding="fox").eval()
    ids = torch.randint(0, 1023, (2, 20))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        x = model.transformer.wte(ids)
        by_hand = [x]
        for block in model.transformer.h:
            x = block(x)
            by_hand.append(x)
        by_hand[-1] = model.transformer.ln_f(x)                       # transformers' convention: the last normed
    assert len(out.hidden_states) == model.config.n_layer + 1
    for got, want in zip(out.hidden_states, by_hand):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, model.lm_head(by_hand[-1]).float(), rtol=0, atol=0)


def test_position_ids_place_tokens_where_they_say():
    """Grids: position_ids are raster positions, equal to explicit coordinates computed by hand;
    a relative encoding gives the same logits for positions shifted by a constant, and GRAPE-AP,
    whose probe rotation R_ℓ reads the absolute position, gives the encoding's own offset path."""
    ids = torch.randint(0, 1023, (2, 30))
    positions = torch.stack([torch.arange(30) + 40, torch.arange(30) * 2])        # any positions, per row
    grid = tiny(pos_encoding="grape_a_grid", grid=(32, 32)).eval()
    coords = torch.stack([positions // 32, positions % 32], -1)
    with torch.no_grad():
        torch.testing.assert_close(grid(input_ids=ids, position_ids=positions).logits,
                                   grid(ids, coords=coords).logits, rtol=0, atol=1e-6)
        rope = tiny(pos_encoding="rope").eval()
        torch.testing.assert_close(rope(input_ids=ids, position_ids=torch.arange(30)[None] + 100).logits,
                                   rope(ids).logits, rtol=1e-4, atol=2e-5)
    encoding = tiny(pos_encoding="grape_ap").transformer.h[0].attn.pos
    x, q, k = torch.randn(2, 30, 32), torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    _, _, by_offset = encoding(x, q, k, offset=57)
    _, _, by_layout = encoding(x, q, k, layout=Layout(positions=torch.arange(57, 87).expand(2, 30)))
    torch.testing.assert_close(by_layout.dense(), by_offset.dense(), rtol=0, atol=0)


def test_resize_token_embeddings_keeps_the_old_tokens():
    model = tiny().eval()
    ids = torch.randint(0, 1023, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    model.resize_token_embeddings(1024 + 8)
    assert model.config.vocab_size == 1032 and model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape[-1] == 1032
    torch.testing.assert_close(after[..., :1024], before, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Outside the repository: Trainer, PEFT, AutoModel, attn_implementation, resize
# ----------------------------------------------------------------------------------------

HF_STACK = r'''
import json, os, sys
import torch
from transformers import (AutoModel, AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)
from peft import LoraConfig, PeftModel, get_peft_model
spec = json.load(open(sys.argv[1]))
folder, work = spec["folder"], spec["work"]
ids = torch.tensor([spec["ids"]])
out = {}
load = lambda path, **kw: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kw).eval()

def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits

# labels=: the loss as transformers computes it, on a batch with ignored positions
model = load(folder)
labels = torch.tensor(spec["labels"])
batch = torch.tensor(spec["batch"])
with torch.no_grad():
    result = model(input_ids=batch, labels=labels)
out["loss"], out["loss_logits"] = result.loss, result.logits

# Trainer, with gradient checkpointing, end to end; the saved folder reloads with equal logits
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
tokenizer.padding_side = "right"
data = [{"input_ids": tokenizer(t)["input_ids"]} for t in spec["texts"]]
args = TrainingArguments(output_dir=os.path.join(work, "trainer"), per_device_train_batch_size=4, max_steps=4,
                         learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                         gradient_checkpointing=True)
model = load(folder).train()
before = {n: p.detach().clone() for n, p in model.named_parameters()}
trainer = Trainer(model=model, args=args, train_dataset=data,
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
trainer.train()
out["trainer_losses"] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
out["trainer_changed"] = sum(not torch.equal(before[n], p) for n, p in model.named_parameters())
out["checkpointing_on"] = bool(model.transformer.gradient_checkpointing)
trainer.save_model(os.path.join(work, "fine-tuned"))
out["fine_tuned"] = logits(model.eval())
out["fine_tuned_reloaded"] = logits(load(os.path.join(work, "fine-tuned")))
out["fine_tuned_files"] = sorted(os.listdir(os.path.join(work, "fine-tuned")))

# PEFT LoRA: trains, saves, reloads, merges
base = load(folder)
lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_q", "c_v"], lora_dropout=0.0,
                                       task_type="CAUSAL_LM"))
trainable = [p for p in lora.parameters() if p.requires_grad]
out["lora_trainable"] = sum(p.numel() for p in trainable)
optimizer = torch.optim.AdamW(trainable, lr=1e-2)
collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
lora.train()
for step in range(3):
    loss = lora(**collate(data[:4])).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
lora.eval()
out["lora"] = logits(lora)
lora.save_pretrained(os.path.join(work, "adapter"))
out["adapter_files"] = sorted(os.listdir(os.path.join(work, "adapter")))
reloaded = PeftModel.from_pretrained(load(folder), os.path.join(work, "adapter")).eval()
out["lora_reloaded"] = logits(reloaded)
merged = reloaded.merge_and_unload().eval()
out["lora_merged"] = logits(merged)
out["merged_class"] = type(merged).__name__
out["base"] = logits(load(folder))

# AutoModel: the base transformer
base_model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    out["automodel_class"] = type(base_model).__name__
    out["automodel_hidden"] = base_model(input_ids=ids).last_hidden_state
    hidden = load(folder)(input_ids=ids, output_hidden_states=True)
out["hidden_states"] = hidden.hidden_states

# attn_implementation: eager is the dense reference, sdpa the fast paths
for name in ("eager", "sdpa"):
    model = load(folder, attn_implementation=name)
    out["backend_" + name] = model.transformer.h[0].attn.backend
    out["logits_" + name] = logits(model)

# resize_token_embeddings (what adding tokens to a tokenizer needs)
model = load(folder)
model.resize_token_embeddings(model.config.vocab_size + 8)
out["resized"] = logits(model)
torch.save(out, spec["out"])
'''

TEXTS = ["def f(x):\n    return x * 2", "The quick brown fox jumps over the lazy dog.", "import os\nprint(os.getcwd())",
         "for i in range(10):\n    print(i)", "class A:\n    pass", "x = [1, 2, 3]\ny = sum(x)",
         "while True:\n    break", "Hello, world! This is a longer sentence than the others."]


@pytest.fixture(scope="module")
def hf_stack(tmp_path_factory, run_without_repository):
    root = tmp_path_factory.mktemp("hf_stack")
    torch.manual_seed(5)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=300, pos_encoding="grape_ap",
                          use_k_shift=True, use_v_shift=True))
    perturb_parameters(model, 0.05)
    folder = str(root / "folder")
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(3)
    batch = torch.randint(0, EOT, (2, 24), generator=g)
    labels = batch.clone()
    labels[0, :5] = -100
    labels[1, 20:] = -100
    spec = {"folder": folder, "work": str(root / "work"), "ids": torch.randint(0, EOT, (260,), generator=g).tolist(),
            "batch": batch.tolist(), "labels": labels.tolist(), "texts": TEXTS, "out": str(root / "out.pt")}
    (root / "spec.json").write_text(json.dumps(spec))
    run_without_repository(HF_STACK, str(root / "spec.json"))
    return dict(spec=spec, model=model.eval(), report=torch.load(spec["out"]))


def test_labels_loss_outside_the_repository(hf_stack):
    report, spec = hf_stack["report"], hf_stack["spec"]
    torch.testing.assert_close(report["loss"].double(),
                               shifted_cross_entropy(report["loss_logits"], torch.tensor(spec["labels"])),
                               rtol=1e-6, atol=1e-6)


def test_trainer_fine_tunes_a_folder_and_the_result_reloads(hf_stack):
    report = hf_stack["report"]
    assert len(report["trainer_losses"]) == 4 and report["trainer_changed"] > 0 and report["checkpointing_on"]
    torch.testing.assert_close(report["fine_tuned_reloaded"], report["fine_tuned"], rtol=0, atol=0)
    assert not torch.allclose(report["fine_tuned"], report["base"], atol=1e-4)          # it did learn something
    # the saved folder is complete: code, tokenizer and card travel with it
    assert {"model.py", "model.safetensors", "tokenizer.json", "README.md"} <= set(report["fine_tuned_files"])


def test_peft_lora_trains_saves_reloads_and_merges(hf_stack):
    report = hf_stack["report"]
    # r = 4 on c_q and c_v of 2 layers: (32 * 4 + 4 * 32) parameters each
    assert report["lora_trainable"] == 2 * 2 * (32 * 4 + 4 * 32)
    assert set(report["adapter_files"]) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not torch.allclose(report["lora"], report["base"], atol=1e-4)                 # the adapter trained
    torch.testing.assert_close(report["lora_reloaded"], report["lora"], rtol=0, atol=0)
    torch.testing.assert_close(report["lora_merged"], report["lora"], rtol=1e-5, atol=1e-5)
    assert report["merged_class"] == "GPT"


def test_automodel_is_the_base_transformer(hf_stack):
    report, model = hf_stack["report"], hf_stack["model"]
    assert report["automodel_class"] == "GPTModel"
    ids = torch.tensor([hf_stack["spec"]["ids"]])
    torch.testing.assert_close(report["automodel_hidden"], report["hidden_states"][-1], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(report["automodel_hidden"]).float(), model(ids).logits,
                                   rtol=0, atol=1e-5)
    assert len(report["hidden_states"]) == model.config.n_layer + 1


def test_attn_implementation_maps_onto_the_backends(hf_stack):
    report = hf_stack["report"]
    assert report["backend_eager"] == "dense" and report["backend_sdpa"] == "auto"
    # T = 260: the dense reference against the fast (chunked) path
    torch.testing.assert_close(report["logits_sdpa"], report["logits_eager"], rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(report["logits_sdpa"], report["base"], rtol=0, atol=0)


def test_resized_embeddings_keep_the_logits_of_the_old_tokens(hf_stack):
    report = hf_stack["report"]
    vocab = report["base"].shape[-1]
    assert report["resized"].shape[-1] == vocab + 8
    torch.testing.assert_close(report["resized"][..., :vocab], report["base"], rtol=0, atol=1e-6)
