# GRAPE-A, query+key-gated, medium (353M): the paper's Table 1 run.
# torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py config/paper/train_llama_mha_grape_a_querykeygated_medium_adam_80g8.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_paper_medium.py')).read())
model_type = 'llama-mha-grape-a-querykeygated'
out_dir = 'out/llama_mha_grape_a_querykeygated_medium'

# GRAPE-A, query+key-gated, as in the original's config
querykeygated_omega_init = None    # softplus(ω̂) = 1 at init, times the ALiBi slopes
keygated_u_l2_norm = True          # key gate vector L2-normalised ...
keygated_u_l2_eps = 1e-6
querygated_v_l2_norm = True        # query gate vector L2-normalised ...
querygated_v_l2_eps = 1e-6
