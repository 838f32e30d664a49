# Small grape_ap model on CPU (pos_encoding = 'grape_ap'); shared settings in train_cpu_base.py.
#   python train_adam_finewebedu.py config/cpu/train_cpu_grape_ap.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_cpu_base.py')).read())
pos_encoding = 'grape_ap'
out_dir = 'out-cpu-grape-ap'
