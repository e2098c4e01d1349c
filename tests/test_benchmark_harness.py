"""benchmarks/harness.py: the shape table builds the models its names say, the clock and the training timer count
what they claim, a child run returns its result or fails with its output, and no file imports another by path."""

import importlib
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.harness import (
    SHAPES,
    ChildFailed,
    Clock,
    Lap,
    median_lap,
    model_config,
    run_child,
    start_child,
    training_timer,
)

REPO = Path(__file__).resolve().parents[1]
SIZE_SUFFIX = re.compile(r"-(?P<count>\d+(?:\.\d+)?)(?P<unit>[mb])$")  # "smollm2-135m", "llama-3.2-1b"
UNITS = {"m": 1e6, "b": 1e9}


# -- shapes --------------------------------------------------------------------------------------------------------


def parameters_on_meta(shape: str) -> int:
    """Parameters of the causal LM of `shape`, built on the meta device (no memory, no time), tied weights once."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", [name for name in SHAPES if SIZE_SUFFIX.search(name)])
def test_a_shape_has_the_parameter_count_its_name_says(shape):
    # to one unit of the name's last digit, as the Hub names them: Llama-3.2-1B has 1.24B parameters, SmolLM2-1.7B 1.71B
    match = SIZE_SUFFIX.search(shape)
    decimals = len(match["count"].partition(".")[2])
    named, last_digit = float(match["count"]) * UNITS[match["unit"]], 10**-decimals * UNITS[match["unit"]]
    assert abs(parameters_on_meta(shape) - named) < last_digit, shape


def test_every_shape_name_but_the_smoke_test_ends_in_its_size():
    assert [name for name in SHAPES if not SIZE_SUFFIX.search(name)] == ["tiny"]


def test_model_config_adds_the_settings_a_shape_leaves_open():
    config = model_config("smollm2-135m", max_position_embeddings=2048, pad_token_id=0)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert config.tie_word_embeddings and config.max_position_embeddings == 2048 and config.pad_token_id == 0


# -- the clock -----------------------------------------------------------------------------------------------------


def test_a_lap_counts_wall_time_and_this_process_cpu_time():
    clock = Clock()
    time.sleep(0.05)  # wall time, no CPU time
    slept = clock.lap()
    sum(i * i for i in range(300_000))  # CPU time
    worked = clock.lap()
    assert slept.wall_s >= 0.05 and slept.cpu_s < 0.04
    assert worked.cpu_s > 0 and worked.wall_s > 0


def test_a_wall_clock_reads_no_cpu_time_and_syncs_before_every_reading():
    syncs = []
    clock = Clock(cpu=False, sync=lambda: syncs.append(time.perf_counter()))
    lap = clock.lap()
    assert lap.cpu_s is None and lap.wall_s >= 0 and len(syncs) == 2  # made, then the lap


def test_median_lap_is_the_median_of_each_clock():
    laps = [Lap(3.0, 1.0), Lap(1.0, 5.0), Lap(2.0, 2.0)]
    assert median_lap(laps) == Lap(2.0, 2.0)
    assert median_lap([Lap(1.0, None), Lap(3.0, 2.0)]) == Lap(2.0, None)  # a wall-only lap: no CPU median


def test_training_timer_laps_every_nth_optimizer_step():
    timer = training_timer(every=2)  # a PPO update of 2 optimizer steps
    timer.on_train_begin(None, None, None)
    for step in range(1, 5):
        timer.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert len(timer.laps) == 2 and all(lap.cpu_s is not None for lap in timer.laps)


def test_training_timer_laps_each_epoch_from_its_start():
    timer = training_timer(unit="epoch")
    timer.on_train_begin(None, None, None)
    time.sleep(0.05)  # between training's start and the epoch's: not in the lap
    for _ in range(3):
        timer.on_epoch_begin(None, None, None)
        timer.on_epoch_end(None, None, None)
    assert len(timer.laps) == 3 and max(lap.wall_s for lap in timer.laps) < 0.05


# -- child runs ----------------------------------------------------------------------------------------------------

CHILD = """
import argparse, sys
from benchmarks.harness import add_result_file_argument, write_json

parser = argparse.ArgumentParser()
parser.add_argument("--value", type=int)
parser.add_argument("--fail", action="store_true")
parser.add_argument("--no_result", action="store_true")
add_result_file_argument(parser)
args = parser.parse_args()
print("child started", file=sys.stderr)
if args.fail:
    raise SystemExit(f"the child gave up on {args.value}")
if not args.no_result:
    write_json(args.result_file, {"doubled": 2 * args.value})
"""


@pytest.fixture
def child_module(tmp_path, monkeypatch) -> dict:
    """A module `echo_child` outside the repository, and the environment that finds it; the test runs elsewhere than
    the repository root, so the child finds benchmarks.harness through the PYTHONPATH the harness sets."""
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "echo_child.py").write_text(CHILD)
    monkeypatch.chdir(tmp_path)
    return {"env": {"PYTHONPATH": str(tmp_path / "modules")}}


def test_a_child_run_returns_the_result_it_wrote(tmp_path, child_module):
    assert run_child("echo_child", ["--value", "21"], tmp_path / "out" / "r.json", **child_module) == {"doubled": 42}
    assert "child started" in (tmp_path / "out" / "r.log").read_text()


def test_children_run_side_by_side(tmp_path, child_module):
    children = [start_child("echo_child", ["--value", str(v)], tmp_path / f"{v}.json", **child_module) for v in (1, 2)]
    assert [child.wait() for child in children] == [{"doubled": 2}, {"doubled": 4}]


def test_a_failed_child_raises_with_the_end_of_its_output(tmp_path, child_module):
    expected = r"(?s)echo_child --value 7 --fail failed with exit code 1.*gave up on 7"
    with pytest.raises(ChildFailed, match=expected) as err:
        run_child("echo_child", ["--value", "7", "--fail"], tmp_path / "r.json", **child_module)
    assert err.value.returncode == 1 and "child started" in err.value.output


def test_a_child_that_writes_no_result_fails_even_with_an_old_result_there(tmp_path, child_module):
    result_file = tmp_path / "r.json"
    result_file.write_text('{"doubled": 0}')  # left by an earlier run
    with pytest.raises(ChildFailed, match="exited 0 but wrote no result"):
        run_child("echo_child", ["--value", "1", "--no_result"], result_file, **child_module)


def test_a_benchmark_child_run_writes_its_row(tmp_path):
    # one configuration of shared_base_memory at the smoke-test shape, as its parent runs it
    row = run_child("benchmarks.shared_base_memory", ["--child", "shared_fp32", "--sizes", "tiny", "--steps", "1",
                                                      "--batch", "1", "--seq", "8"], tmp_path / "row.json")  # fmt: skip
    assert row["config"] == "shared_fp32" and row["size"] == "tiny"
    assert row["step_s"] > 0 and row["cpu_s"] > 0 and row["peak_rss_mb"] > 0 and row["trainable_m"] > 0


# -- imports by module name ----------------------------------------------------------------------------------------

PATH_IMPORTS = ("sys.path" + ".insert", "spec_from" + "_file_location")  # split, so that this file holds neither
# rlhf_ext/frontier.py puts the current folder on sys.path to import a user's reward module by name ("module:function",
# as TRL's GRPO script does): user code, not a repository file imported by path
USER_MODULE_LOOKUP = {"rlhf_ext/frontier.py"}


def repository_python_files() -> list[str]:
    """Every .py file of the checkout, committed or not, that git does not ignore (so not .venv/)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    return [path for path in listed if (REPO / path).is_file()]


def test_no_python_file_imports_another_by_path():
    offenders = [path for path in repository_python_files() if path not in USER_MODULE_LOOKUP
                 and any(pattern in (REPO / path).read_text() for pattern in PATH_IMPORTS)]  # fmt: skip
    assert offenders == []


@pytest.mark.parametrize("module", sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem != "__init__"))
def test_every_benchmark_imports_as_a_module_of_the_package(module):
    assert importlib.import_module(f"benchmarks.{module}").__doc__


# -- ppo_shared_prompt: one PPO update per phase, unshared vs shared ---------------------------------------------


def test_ppo_shared_prompt_quick_run_samples_the_same_completions_and_times_every_phase(tmp_path):
    # --quick at the smoke-test shape: what is under test is that sharing leaves the run as it was and that the
    # phases are read from the trainer, not the timings themselves
    import json

    from benchmarks import ppo_shared_prompt

    output = tmp_path / "r.json"
    result = ppo_shared_prompt.main(["--quick", "--size", "tiny", "--output", str(output)])
    unshared, shared = result["runs"]["unshared"], result["runs"]["shared"]
    assert (unshared["shared_prompt_active"], shared["shared_prompt_active"]) == (False, True)
    batches = len(result["meta"]["batch_prompt_tokens"])  # the warm-up and one timed generation batch
    assert batches == 2 and result["same_rollouts"] == batches
    micro_batches = batches * ppo_shared_prompt.STEPS_PER_GENERATION
    assert len(unshared["losses"]) == len(shared["losses"]) == micro_batches
    assert result["max_abs_loss_diff"] < 1e-5
    for run in (unshared, shared):
        assert len(run["batches"]) == batches
        for batch in run["batches"]:
            assert all(batch[phase]["cpu_s"] > 0 for phase in (*ppo_shared_prompt.PHASES, "total"))
            parts = sum(batch[phase]["cpu_s"] for phase in ppo_shared_prompt.PHASES)
            assert parts == pytest.approx(batch["total"]["cpu_s"])
    (row,) = result["rows"]
    assert row["prompt_tokens"] == 16 and row["repeats"] == 1
    assert row["unshared"]["total"]["cpu_s"] == unshared["batches"][1]["total"]["cpu_s"]  # the warm-up is not timed
    ratio = row["unshared"]["update"]["cpu_s"] / row["shared"]["update"]["cpu_s"]
    assert row["ratio_cpu"]["update"] == pytest.approx(ratio)
    assert json.loads(output.read_text())["rows"] == result["rows"]


def test_real_size_runs_the_unshared_k_way_twins_only_when_named():
    from benchmarks import real_size

    specs = real_size.configurations("float32")
    twins = [name for name in specs if name.endswith("_unshared")]
    assert twins == ["kway_dpo_fp32_unshared", "kway_dpo_bf16_unshared", "kway_reward_fp32_unshared",
                     "kway_reward_bf16_unshared"]  # fmt: skip
    for twin in twins:
        shared = specs[twin.removesuffix("_unshared")]
        assert specs[twin].shared_prompt is False and shared.shared_prompt is None
        assert (specs[twin].stage, specs[twin].bits, specs[twin].dtype) == (shared.stage, shared.bits, shared.dtype)
    assert real_size.parse_args([]).configs == [name for name in specs if name not in twins]
