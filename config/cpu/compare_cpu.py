# Base config of compare_encodings.py on a CPU: every encoding trains this model on the offline
# corpus (python data/pydoc/prepare.py) with this budget and schedule; the comparison adds
# --pos_encoding, --seed, --data_seed and --out_dir per run.
#   python -m scripts.compare_encodings config/cpu/compare_cpu.py --encodings all --seeds 3 --eval_windows 16
# Sized so that 16 encodings x 3 seeds take about 1.2 hours on 2 CPU cores, two runs at a time
# with one thread each (see README, "Comparing encodings"): 73,728 training tokens per run.
dataset = 'pydoc'
device = 'cpu'
compile = False

n_layer = 4
n_head = 4
n_embd = 256
head_dim = 64
block_size = 256
p_head_dim = 8

batch_size = 4
gradient_accumulation_steps = 1
max_iters = 72                 # 72 x 1,024 tokens
lr_decay_iters = 72
warmup_iters = 10
learning_rate = 3e-3
min_lr = 1e-4
eval_interval = 12             # 7 points on each validation curve
eval_iters = 4                 # 4 x 4 x 256 = 4,096 validation tokens, the same batches for every run
log_interval = 4

seed = 1337                    # run i: seed + i and data_seed + i
data_seed = 1337
eval_seed = 1337
