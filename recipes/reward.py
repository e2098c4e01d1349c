"""Runs the `reward` recipe, `rlhf_ext.scripts.reward` (`rlhf-ext reward` after pip install), from a clone:

    accelerate launch recipes/reward.py --config recipes/configs/reward.yaml [--FLAG VALUE ...]
"""

from rlhf_ext.scripts.cli import run

if __name__ == "__main__":
    run("reward")
