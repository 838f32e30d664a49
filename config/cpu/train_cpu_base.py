# Shared settings of the small CPU configs (config/train_cpu_<encoding>.py exec this file).
# A few minutes on 2 cores on the offline corpus (python data/pydoc/prepare.py); the validation
# loss falls from ~10.8 (uniform over the vocabulary).
dataset = 'pydoc'
device = 'cpu'
compile = False

n_layer = 2
n_head = 2
n_embd = 128
head_dim = 64
block_size = 128
p_head_dim = 8

batch_size = 8
gradient_accumulation_steps = 1
max_iters = 120
lr_decay_iters = 120
warmup_iters = 15
learning_rate = 3e-3
min_lr = 1e-4
eval_interval = 20
eval_iters = 10
log_interval = 10
