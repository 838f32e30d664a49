# GRAPE-M, contextual (phase-modulated), medium (353M): the paper's Table 1 run.
# torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py config/paper/train_llama_mha_grape_m_ctx_medium_adam_80g8.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_paper_medium.py')).read())
model_type = 'llama-mha-grape-m-ctx'
out_dir = 'out/llama_mha_grape_m_ctx_medium'

# GRAPE-M, contextual, as in the original's config
grape_base = 10000.0               # initial spectrum = RoPE's
grape_learnable_freq = True        # learn θ (stored as log θ)
grape_share_across_heads = True    # one spectrum shared by all heads
grape_ctx_per_head = False         # one phase Φ_t shared across heads
grape_ctx_init_omega = 1e-3        # gate bias softplus⁻¹(1e-3): ω₀ = sigmoid(bias/16) ≈ 0.39
