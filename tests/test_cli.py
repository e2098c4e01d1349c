"""`rlhf-ext <recipe>`: the recipes as an installed command (rlhf_ext/scripts), as `trl dpo` is for TRL."""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from rlhf_ext.scripts.cli import COMMANDS, main


def test_the_console_script_is_installed():
    scripts = {entry.name: entry.value for entry in entry_points(group="console_scripts")}
    assert scripts.get("rlhf-ext") == "rlhf_ext.scripts.cli:main"


def test_help_lists_every_recipe(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhf-ext {ppo,online_kway,dpo,reward,frontier}")
    assert all(f"  {name}" in out for name in COMMANDS)


# what each command's --help starts with: the training recipes take a YAML config, the frontier report its inputs
USAGE_STARTS = {
    **{command: f"usage: {command}.py --config recipes/configs/{command}.yaml" for command in COMMANDS},
    "frontier": "usage: frontier.py --reference MODEL --policies LABEL=DIR",
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_reaches_its_recipe(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(USAGE_STARTS[command])


def test_an_unknown_command_names_the_commands(capsys):
    assert main(["sft", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'sft'" in err and "ppo, online_kway, dpo, reward, frontier" in err


def test_the_module_runs_as_accelerate_launch_m_runs_it():
    done = subprocess.run(
        [sys.executable, "-m", "rlhf_ext.scripts.reward", "--help"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: reward.py --config")
