# GRAPE-A, query-gated, medium (353M), with KV-shift: a run of the original repository (not in the paper's Table 1).
# torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py config/paper/train_llama_mha_grape_a_querygated_kvshift_medium_adam_80g8.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_paper_medium.py')).read())
model_type = 'llama-mha-grape-a-querygated'
out_dir = 'out/llama_mha_grape_a_querygated_kvshift_medium'
use_k_shift = True
use_v_shift = True

# GRAPE-A, query-gated, as in the original's config
querygated_omega_init = None       # softplus(ω̂) = 1 at init, times the ALiBi slopes
querygated_v_l2_norm = True        # gate vector L2-normalised ...
querygated_v_l2_eps = 1e-6         # ... with this eps
