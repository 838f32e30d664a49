# Small grape_m_planes model on CPU (pos_encoding = 'grape_m_planes'); shared settings in train_cpu_base.py.
# Learned mutually orthogonal planes (unitary butterfly frame), Rodrigues application; starts as RoPE.
#   python train_adam_finewebedu.py config/cpu/train_cpu_grape_m_planes.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_cpu_base.py')).read())
pos_encoding = 'grape_m_planes'
out_dir = 'out-cpu-grape-m-planes'
