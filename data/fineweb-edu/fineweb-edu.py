"""Alias of prepare.py under the original repository's name: `python fineweb-edu.py [options]`."""
import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare.py"), run_name="__main__")
