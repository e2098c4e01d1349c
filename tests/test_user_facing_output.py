"""What a new user reads (issue 20, item 7): where PPO saved, the demo's --help, the memory estimate's errors and
table, the README's install lines and demo cost, dependencies, and numbers in the docs that must agree."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scripts import load_recipe
from test_hub_push import recipe_argv, run, workdir  # noqa: F401 (workdir is a fixture)
from transformers import LlamaConfig

from rlhf_ext.memory import main as memory_main

ROOT = Path(__file__).resolve().parents[1]


def test_ppo_recipe_prints_where_it_saved(workdir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    run("ppo", recipe_argv("ppo", workdir, out))
    printed = capsys.readouterr().out
    assert re.search(rf"saved to {re.escape(str(out / 'policy'))}", printed), printed[-500:]


def test_demo_help_starts_with_a_usage_block(capsys):
    demo = load_recipe("demo")
    with pytest.raises(SystemExit) as exit_info:
        demo.make_parser().parse_args_and_config(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    head = out[: out.index("options:")]
    assert out.startswith("usage: python -m demo --config") and len(head.splitlines()) < 30
    assert "recipes/configs/demo.yaml" in head and "--tiny" in head


def test_demo_frontier_help_starts_with_its_own_usage_block(capsys):
    import demo.frontier as demo_frontier

    with pytest.raises(SystemExit) as exit_info:
        demo_frontier.make_parser().parse_args_and_config(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    head = out[: out.index("options:")]
    assert out.startswith("usage: python -m demo.frontier --config") and len(head.splitlines()) < 30
    assert "--online_kway_args" in head and "--frontier_args" in head


def test_memory_near_miss_of_a_known_shape_says_unknown_shape(capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory_main(["--model", "llama-3-8b"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown shape" in err and "known: " in err and "llama-3.1-8b" in err
    assert len(err.strip().splitlines()) <= 4 and "Traceback" not in err


def test_memory_table_states_units_and_the_sizes_it_assumed(tmp_path, capsys):
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=100).save_pretrained(tmp_path)
    memory_main(["--model", str(tmp_path), "--bits", "16", "--batch_size", "3", "--prompt_length", "8",
                 "--completion_length", "5"])
    out = capsys.readouterr().out
    assert "GiB" in out
    assert "batch 3" in out and "prompt 8 tokens" in out and "completion 5 tokens" in out and "K = 4" in out


def test_readme_install_lines_have_no_placeholder_url():
    readme = (ROOT / "README.md").read_text()
    install = readme.split("## Add it to your project", 1)[1].split("##", 1)[0]
    assert "<URL" not in install and "git+<" not in install


def test_readme_states_the_demo_cost_in_cpu_minutes_and_peak_memory():
    demo = (ROOT / "README.md").read_text().split("## The demo", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"\d+ CPU-minutes", demo) and re.search(r"peak (RSS|memory)[^.]*\d+(\.\d+)? GiB", demo)


def test_declared_dependencies_are_imported():
    # `evaluate` was declared and never imported: each runtime dependency must be used by the package or recipes
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0].lower() for dep in dependencies}
    sources = "".join(p.read_text() for folder in ("rlhf_ext", "recipes") for p in (ROOT / folder).rglob("*.py"))
    assert "evaluate" not in names or re.search(r"^\s*(import|from) evaluate\b", sources, re.M)


def test_docs_demo_names_the_dpo_steps_demo_yaml_ships():
    steps = yaml.safe_load((ROOT / "recipes" / "configs" / "demo.yaml").read_text())["dpo_args"]["max_steps"]
    text = (ROOT / "docs" / "demo.md").read_text()
    claimed = re.search(r"the demo instead takes fewer DPO steps\s+\((\d+)", text).group(1)
    assert int(claimed) == steps


def test_demo_report_points_at_samples_where_they_are():
    from demo import report

    for text in (report.CAVEATS if hasattr(report, "CAVEATS") else Path(report.__file__).read_text(),
                 (ROOT / "docs" / "demo-report.md").read_text()):
        assert "samples below" not in text
    shipped = (ROOT / "docs" / "demo-report.md").read_text()
    assert shipped.index("## Sample completions") < shipped.index("read the samples above")


def test_docs_ppo_quotes_one_timing_of_the_135m_benchmark():
    text = (ROOT / "docs" / "ppo.md").read_text()
    rows = re.findall(r"^\s*135m\s+134\.6M \|\s+([\d.]+)\s+([\d.]+)", text, re.M)
    assert len({row for row in rows}) == 1, f"docs/ppo.md gives different 135m timings: {rows}"


@pytest.mark.parametrize("recipe", ["ppo", "dpo", "reward"])
def test_help_prints_nothing_before_its_usage_block_offline(recipe):
    """Offline, on a CPU with AVX512-BF16, bitsandbytes' import printed two kernel-download notices before --help."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, f"recipes/{recipe}.py", "--help"], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1], timeout=300)
    assert done.returncode == 0
    assert (done.stderr + done.stdout).startswith("usage:"), (done.stderr + done.stdout)[:300]
