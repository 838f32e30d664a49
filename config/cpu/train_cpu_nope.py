# Small nope model on CPU (pos_encoding = 'nope'); shared settings in train_cpu_base.py.
#   python train_adam_finewebedu.py config/cpu/train_cpu_nope.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_cpu_base.py')).read())
pos_encoding = 'nope'
out_dir = 'out-cpu-nope'
