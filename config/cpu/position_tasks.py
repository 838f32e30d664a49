# Synthetic-task part of the position study (scripts/position_study.py): one small model per
# (encoding, seed) trained on the mixture of the four tasks at train_length, scored at 1x-8x it.
# Keys: the fields of training.position_study.TaskStudyConfig, plus seed (run i uses seed + i).
# Calibrated by single-seed pilots on 2 cores: at length 64 with 4 heads and 1,500 steps ALiBi
# learned none of the tasks (accuracy <= 0.05; its steepest slope with 4 heads is only 1/4) and
# NoPE only part of passkey; at length 32 with 8 heads and 3,000 steps RoPE, ALiBi and NoPE all
# solve copy and passkey at 1x. About 150 s of CPU per run, a few seconds of evaluation.
tasks = ("recall", "copy", "passkey", "lag")
train_length = 32
multipliers = (1, 2, 4, 8)

n_layer = 2
n_head = 8
n_embd = 128
p_head_dim = 8

batch_size = 32
max_iters = 3000          # 3000 x 32 x 32 = 3.1M tokens
learning_rate = 3e-3
min_lr = 1e-4
warmup_iters = 100
weight_decay = 0.01
grad_clip = 1.0

eval_sequences = 128       # per task and length
eval_seed = 4242
seed = 1337
