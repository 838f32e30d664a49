# GRAPE-M, non-contextual (learned commuting frequencies), large (770M): the paper's Table 2 run.
# torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py config/paper/train_llama_mha_grape_m_nonctx_large_adam_80g8.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_paper_large.py')).read())
model_type = 'llama-mha-grape-m-nonctx'
out_dir = 'out/llama_mha_grape_m_nonctx_large'

# GRAPE-M, non-contextual, as in the original's config
grape_base = 10000.0               # initial spectrum = RoPE's
grape_learnable_freq = True        # learn θ (stored as 16·log θ, grape_log_freq_scale)
grape_share_across_heads = True    # one spectrum shared by all heads
