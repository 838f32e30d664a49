# Small grape_m_nc model on CPU (pos_encoding = 'grape_m_nc'); shared settings in train_cpu_base.py.
#   python train_adam_finewebedu.py config/cpu/train_cpu_grape_m_nc.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_cpu_base.py')).read())
pos_encoding = 'grape_m_nc'
out_dir = 'out-cpu-grape-m-nc'
