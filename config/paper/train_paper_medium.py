# Medium models (353M) of the paper's Table 1; shared settings in train_paper_base.py.
# Global batch 480 x 4096 tokens = 20 per GPU x 3 accumulation x 8 GPUs; on fewer GPUs raise
# gradient_accumulation_steps to keep 480 (it is per rank).
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_paper_base.py')).read())
n_layer = 24
n_head = 8
n_embd = 1024
batch_size = 20
gradient_accumulation_steps = 60 // batch_size
learning_rate = 1e-3               # as in the released configs; the paper's text says 2e-3 for medium models
