# Small grape_a_q model on CPU (pos_encoding = 'grape_a_q'); shared settings in train_cpu_base.py.
#   python train_adam_finewebedu.py config/cpu/train_cpu_grape_a_q.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_cpu_base.py')).read())
pos_encoding = 'grape_a_q'
out_dir = 'out-cpu-grape-a-q'
