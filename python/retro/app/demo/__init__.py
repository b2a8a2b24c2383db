"""`retro demo`: one pipeline (pipeline.py) run by recipes (recipes.py): RETRO from scratch or a
pretrained LM RETROfitted, on the CPU or a GPU."""
from .options import DemoOptions
from .pipeline import run_demo

__all__ = ["DemoOptions", "run_demo"]
