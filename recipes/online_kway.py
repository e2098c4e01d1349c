"""Runs the `online_kway` recipe, `rlhf_ext.scripts.online_kway` (`rlhf-ext online_kway` after install), from a clone:

    accelerate launch recipes/online_kway.py --config recipes/configs/online_kway.yaml [--FLAG VALUE ...]
"""

from rlhf_ext.scripts.cli import run

if __name__ == "__main__":
    run("online_kway")
