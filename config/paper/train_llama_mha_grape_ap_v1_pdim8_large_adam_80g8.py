# GRAPE-AP (path-integral additive), large (770M): the paper's Table 2 run.
# torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py config/paper/train_llama_mha_grape_ap_v1_pdim8_large_adam_80g8.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_paper_large.py')).read())
model_type = 'llama-mha-grape-ap-v1'
out_dir = 'out/llama_mha_grape_ap_v1_pdim8_large'

# GRAPE-AP, as in the original's config
p_tie_mode = 'none'                # untied probe projection
p_head_dim = 8                     # probe width per head
