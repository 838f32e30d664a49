# Large models (770M) of the paper's Table 2; shared settings in train_paper_base.py.
# Global batch 480 x 4096 tokens = 15 per GPU x 4 accumulation x 8 GPUs; on fewer GPUs raise
# gradient_accumulation_steps to keep 480 (it is per rank).
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_paper_base.py')).read())
n_layer = 36
n_head = 10
n_embd = 1280
batch_size = 15
gradient_accumulation_steps = 60 // batch_size
learning_rate = 1e-3               # the paper's value for large models
