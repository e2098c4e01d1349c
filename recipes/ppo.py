"""Runs the `ppo` recipe, `rlhf_ext.scripts.ppo` (`rlhf-ext ppo` after pip install), from a clone:

    accelerate launch recipes/ppo.py --config recipes/configs/ppo.yaml [--FLAG VALUE ...]
"""

from rlhf_ext.scripts.cli import run

if __name__ == "__main__":
    run("ppo")
