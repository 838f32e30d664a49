# Small rope model on CPU (pos_encoding = 'rope'); shared settings in train_cpu_base.py.
#   python train_adam_finewebedu.py config/cpu/train_cpu_rope.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_cpu_base.py')).read())
pos_encoding = 'rope'
out_dir = 'out-cpu-rope'
