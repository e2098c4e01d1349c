"""Runs the `dpo` recipe, `rlhf_ext.scripts.dpo` (`rlhf-ext dpo` after pip install), from a clone:

    accelerate launch recipes/dpo.py --config recipes/configs/dpo.yaml [--FLAG VALUE ...]
"""

from rlhf_ext.scripts.cli import run

if __name__ == "__main__":
    run("dpo")
