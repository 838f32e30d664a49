# Small grape_a_dict model on CPU (pos_encoding = 'grape_a_dict'); shared settings in train_cpu_base.py.
# 4 content-gated additive atoms per head (commuting unipotent dictionary).
#   python train_adam_finewebedu.py config/cpu/train_cpu_grape_a_dict.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_cpu_base.py')).read())
pos_encoding = 'grape_a_dict'
out_dir = 'out-cpu-grape-a-dict'
