# GRAPE-M, non-contextual (learned commuting frequencies), large (770M): the paper's Table 2 run.
# torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py config/train_llama_mha_grape_m_nonctx_large_adam_80g8.py
# Global batch 480 x 4096 tokens = 15 per GPU x 4 accumulation x 8 GPUs; on fewer GPUs raise
# gradient_accumulation_steps to keep 480 (it is per rank). 25000 iterations ~ 49B tokens.
import time
import os
from datetime import datetime

# Wandb configs
wandb_log = False                  # True to log to wandb (wandb_mode = 'offline' needs no network)
wandb_project = 'grape'

# Model configs
n_layer = 36
n_head = 10
n_embd = 1280
head_dim = 128
dropout = 0.0
bias = False
using_groupnorm = False
use_qk_rmsnorm = True              # learnable RMSNorm on Q and K (training stability)
embedding_init_std = 0.02
hidden_init_std_factor = 0.5       # hidden matrices: std = 0.5 / sqrt(n_embd)

# GRAPE-M, non-contextual (learned commuting frequencies)
rope_base = 10000.0             # initial spectrum = RoPE's

# KV shifting
use_k_shift = False
use_v_shift = False

# Training configs
dataset = 'fineweb-edu/fineweb-edu100B'   # data/fineweb-edu/fineweb-edu100B/{train,val}_*.bin, from data/fineweb-edu/prepare.py
seed = 42
data_seed = 42
eval_seed = 42
batch_size = 15
block_size = 4096
gradient_accumulation_steps = 60 // batch_size
max_iters = 25000
lr_decay_iters = 25000
eval_interval = 1000
eval_iters = 200
log_interval = 10
out_dir = 'out/llama_mha_grape_m_nonctx_large'

# Optimizer configs
optimizer_name = 'adamw'
learning_rate = 1e-3               # the paper's value for large models
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
model_type = 'llama-mha-grape-m-nonctx'
