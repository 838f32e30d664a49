# Small grape_m_basis model on CPU with the basis shared as Algorithm 1 writes it: one learned
# orthogonal E for all heads, one spectrum per head. Shared settings in train_cpu_base.py.
#   python train_adam_finewebedu.py config/cpu/train_cpu_grape_m_basis_shared.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_cpu_base.py')).read())
pos_encoding = 'grape_m_basis'
grape_basis_shared = True
grape_m_per_head = True
out_dir = 'out-cpu-grape-m-basis-shared'
