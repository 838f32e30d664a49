# Small grape_a_grid model on CPU (pos_encoding = 'grape_a_grid'); shared settings in train_cpu_base.py.
# Text laid out as 8 lines of 16 tokens (raster order) to exercise the 2D code path; for a real
# 2D use see examples/grid_next_patch.py.
#   python train_adam_finewebedu.py config/cpu/train_cpu_grape_a_grid.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_cpu_base.py')).read())
pos_encoding = 'grape_a_grid'
out_dir = 'out-cpu-grape-a-grid'
grid = (8, 16)
