# Small grape_m_ctx_dict model on CPU (pos_encoding = 'grape_m_ctx_dict'); shared settings in train_cpu_base.py.
# 4 token-driven phase channels mixed per head over RoPE's planes; starts as RoPE.
#   python train_adam_finewebedu.py config/cpu/train_cpu_grape_m_ctx_dict.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_cpu_base.py')).read())
pos_encoding = 'grape_m_ctx_dict'
out_dir = 'out-cpu-grape-m-ctx-dict'
