# Settings shared by the 30 runs of the original repository, among them the paper's Tables 1-2
# (config/train_llama_mha_*_adam_80g8.py exec train_paper_medium.py or train_paper_large.py,
# which exec this file). Key names and values follow the original's configs, except logging and
# paths (wandb_log, wandb_project, dataset, out_dir; tests/test_config.py lists why). Global
# batch 480 sequences x 4096 tokens on 8 GPUs.

# Wandb configs
wandb_log = False                  # True to log to wandb (wandb_mode = 'offline' needs no network)
wandb_project = 'grape'

# Model configs
head_dim = 128
dropout = 0.0
bias = False
using_groupnorm = False
use_qk_rmsnorm = True              # learnable RMSNorm on Q and K (training stability)
embedding_init_std = 0.02
hidden_init_std_factor = 0.5       # hidden matrices: std = 0.5 / sqrt(n_embd)

# KV shifting (the *_kvshift_* runs turn both on)
use_k_shift = False
use_v_shift = False

# Training configs
dataset = 'fineweb-edu/fineweb-edu100B'   # data/fineweb-edu/fineweb-edu100B/{train,val}_*.bin, from data/fineweb-edu/prepare.py
seed = 42                          # data_seed and eval_seed follow it (-1 by default)
block_size = 4096
max_iters = 25000                  # 25000 x 480 x 4096 tokens ~ 49B tokens
lr_decay_iters = 25000
eval_interval = 1000
eval_iters = 2000                  # validation batches per evaluation, as the original's configs
log_interval = 10

# Optimizer configs
optimizer_name = 'adamw'
learning_rate = 1e-3               # the paper's value for large models; medium: see train_paper_medium.py
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
decay_lr = True
warmup_iters = 2000
min_lr = 3e-5
schedule = 'cosine'

# System configs
dtype = 'bfloat16'
compile = True
