# Language-model part of the position study (scripts/position_study.py): every encoding trains
# this model on the offline corpus with a 4,096-token vocabulary (python data/pydoc4k/prepare.py)
# at a short context, then is evaluated at 1x-8x it. The study adds --pos_encoding, --seed,
# --data_seed and --out_dir per run (through scripts/compare_encodings).
# Calibrated on 2 cores: after 500 x 2,048 tokens RoPE's loss at positions 448-511 of a 512-token
# window was 0.43 nats above what the same tokens get with only their 64-token block (NoPE: 0.13).
# About 2 min of training per run with one thread; the 4,096-token vocabulary makes it ~6x faster
# than GPT-2's 50,304 (data/pydoc4k/prepare.py).
dataset = 'pydoc4k'
vocab_size = 4096
device = 'cpu'
compile = False

n_layer = 4
n_head = 4
n_embd = 128
head_dim = 32
block_size = 64
p_head_dim = 8

batch_size = 32
gradient_accumulation_steps = 1
max_iters = 400                # 400 x 2,048 = 819,200 tokens
lr_decay_iters = 400
warmup_iters = 30
learning_rate = 3e-3
min_lr = 1e-4
eval_interval = 100
eval_iters = 8
log_interval = 20

seed = 1337
data_seed = 1337
eval_seed = 1337
