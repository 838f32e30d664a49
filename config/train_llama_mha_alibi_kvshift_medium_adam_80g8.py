# ALiBi, medium (353M), with KV-shift: the paper's Table 1 run.
# torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py config/train_llama_mha_alibi_kvshift_medium_adam_80g8.py
# Global batch 480 x 4096 tokens = 20 per GPU x 3 accumulation x 8 GPUs; on fewer GPUs raise
# gradient_accumulation_steps to keep 480 (it is per rank). 25000 iterations ~ 49B tokens.
import time
import os
from datetime import datetime

# Wandb configs
wandb_log = False                  # True to log to wandb (wandb_mode = 'offline' needs no network)
wandb_project = 'grape'

# Model configs
n_layer = 24
n_head = 8
n_embd = 1024
head_dim = 128
dropout = 0.0
bias = False
using_groupnorm = False
use_qk_rmsnorm = True              # learnable RMSNorm on Q and K (training stability)
embedding_init_std = 0.02
hidden_init_std_factor = 0.5       # hidden matrices: std = 0.5 / sqrt(n_embd)

# KV shifting
use_k_shift = True
use_v_shift = True

# Training configs
dataset = 'fineweb-edu/fineweb-edu100B'   # data/fineweb-edu/fineweb-edu100B/{train,val}_*.bin, from data/fineweb-edu/prepare.py
seed = 42
data_seed = 42
eval_seed = 42
batch_size = 20
block_size = 4096
gradient_accumulation_steps = 60 // batch_size
max_iters = 25000
lr_decay_iters = 25000
eval_interval = 1000
eval_iters = 200
log_interval = 10
out_dir = 'out/llama_mha_alibi_kvshift_medium'

# Optimizer configs
optimizer_name = 'adamw'
learning_rate = 1e-3               # as in the released configs; the paper's text says 2e-3 for medium models
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
model_type = 'llama-mha-alibi'
