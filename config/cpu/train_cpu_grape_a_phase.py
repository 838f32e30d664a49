# Small grape_a_phase model on CPU (pos_encoding = 'grape_a_phase'); shared settings in train_cpu_base.py.
# b_h(t, j) = -theta_h (Phi_t - Phi_j), Phi a token-driven clock; starts as ALiBi.
#   python train_adam_finewebedu.py config/cpu/train_cpu_grape_a_phase.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_cpu_base.py')).read())
pos_encoding = 'grape_a_phase'
out_dir = 'out-cpu-grape-a-phase'
