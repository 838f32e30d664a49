# GRAPE-AP (path-integral additive), medium (353M): the paper's Table 1 run.
# torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py config/paper/train_llama_mha_grape_ap_v1_pdim8_medium_adam_80g8.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_paper_medium.py')).read())
model_type = 'llama-mha-grape-ap-v1'
out_dir = 'out/llama_mha_grape_ap_v1_pdim8_medium'

# GRAPE-AP, as in the original's config
p_tie_mode = 'none'                # untied probe projection
p_head_dim = 8                     # probe width per head
