# ALiBi, large (770M), with KV-shift: the paper's Table 2 run.
# torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py config/paper/train_llama_mha_alibi_kvshift_large_adam_80g8.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_paper_large.py')).read())
model_type = 'llama-mha-alibi'
out_dir = 'out/llama_mha_alibi_kvshift_large'
use_k_shift = True
use_v_shift = True
