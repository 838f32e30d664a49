# FoX (Forgetting Transformer, no FoX-Pro), medium (353M): the paper's Table 1 run.
# torchrun --standalone --nproc_per_node=8 train_adam_finewebedu.py config/paper/train_llama_mha_fox_medium_adam_80g8.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_paper_medium.py')).read())
model_type = 'llama-mha-fox'
out_dir = 'out/llama_mha_fox_medium'
