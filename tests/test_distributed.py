"""The trainers under sharding engines, on 2 CPU processes: DeepSpeed ZeRO-2 and ZeRO-3 and FSDP2 through
`accelerate launch` with the shipped configs (recipes/accelerate_configs/; FSDP through a test-only shim, since
accelerate turns FSDP on only for GPUs), and the shared base under `fully_shard` directly, under torchrun.

Each 2-process run is checked against an independent expectation: the same training in one process with no engine,
on the same global batch. After N optimizer steps the trained weights must be identical on both processes and equal,
to float tolerance, to the one-process run; the folders the trainers save must load without the engine and hold
those weights; a ZeRO-3 checkpoint must resume to exactly the weights of the uninterrupted run.

A launch counts as passed only if its worker printed the success line (RLHF_EXT_OK ...): multi-process launches
occasionally abort at shutdown after the work is done, so the exit code alone is not the signal. The first DeepSpeed
launch on a machine compiles a small C++ extension (~1-2 min, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rlhf_ext.models import SharedBase, SharedBaseArguments, load_head, save_adapter_with_head
from rlhf_ext.testing import randomize_lora, save_tiny_model, tiny_causal_lm, tiny_llama_config, tiny_tokenizer

requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install -e '.[test]' or '.[deepspeed]' installs it)",
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate_configs"
WORKER = REPO / "tests" / "distributed_worker.py"
FSDP2_WORKER = REPO / "tests" / "fsdp2_worker.py"
MARKER = "RLHF_EXT_OK"
LAUNCH_TIMEOUT = 600
# The 2-process runs differ from the one-process run only by the order of float sums (gradients reduced across
# processes, partitioned optimizer steps); three Adam steps at lr 1e-2 keep that below 1e-5.
TOLERANCE = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """A tiny causal LM, a tiny sequence classifier with its score head saved (the reward trainer's base), and a
    reward role folder with random weights (so PPO's scores are not all equal)."""
    root = tmp_path_factory.mktemp("distributed")
    base = save_tiny_model(root / "base", seed=0)
    torch.manual_seed(3)
    classifier = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    classifier.save_pretrained(root / "reward_base")
    tiny_tokenizer().save_pretrained(root / "reward_base")
    donor = SharedBase(
        tiny_causal_lm(seed=0),
        SharedBaseArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
                            model_name_or_path=base),
    )  # fmt: skip
    randomize_lora(donor.peft_model, "value", seed=5, scale=0.3)
    with torch.no_grad():
        donor.heads["value"].linear.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(6))
    save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], root / "reward", "reward")
    return {"base": base, "reward_base": str(root / "reward_base"), "reward_adapter": str(root / "reward")}


def run_command(command: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT, cwd=REPO)


def run_logged(command: list[str], what: str, extra_env: dict | None = None) -> dict:
    """Run `command`; the parsed JSON of its success line. Fails with the output's tail if the line is missing."""
    start = time.monotonic()
    result = run_command(command, extra_env)
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARKER)]
    output = f"{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    assert lines, f"{what}: no success line (exit code {result.returncode}):\n{output}"
    if result.returncode != 0:  # the work was done and reported; only the shutdown failed
        print(f"{what}: exit code {result.returncode} after the success line (shutdown)", file=sys.stderr)
    print(f"{what}: {time.monotonic() - start:.1f} s", file=sys.stderr)
    return json.loads(lines[-1][len(MARKER):])


def worker_args(trainer: str, assets: dict, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--trainer", trainer, "--base", assets["base"], "--reward_base", assets["reward_base"],
        "--reward_adapter", assets["reward_adapter"], "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


# accelerate runs FSDP only on GPU-like devices; the test-only shim tests/fsdp_cpu_shim.py lets it run on CPU processes
FSDP_ON_CPU = {"RLHF_EXT_FSDP_ON_CPU": "1"}


def launch_command(config: str, trainer: str, assets: dict, output_dir: Path, *extra: str) -> list[str]:
    """The worker on 2 CPU processes under a shipped accelerate config (on CPU: mixed precision off)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", str(WORKER),
        *worker_args(trainer, assets, output_dir, *extra),
    ]  # fmt: skip


def launch(config: str, trainer: str, assets: dict, output_dir: Path, *extra: str) -> dict:
    extra_env = FSDP_ON_CPU if config.startswith("fsdp") else None
    return run_logged(launch_command(config, trainer, assets, output_dir, *extra), f"{config} {trainer}", extra_env)


def single_process(trainer: str, assets: dict, output_dir: Path, *extra: str) -> dict:
    """The worker in one process, no engine: the expectation for the 2-process runs."""
    return run_logged([sys.executable, str(WORKER), *worker_args(trainer, assets, output_dir, *extra)], f"1 {trainer}")


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """trainer -> the one-process run's trained weights (run once per trainer, on first use)."""
    cache = {}

    def get(trainer: str) -> dict[str, torch.Tensor]:
        if trainer not in cache:
            out = tmp_path_factory.mktemp(f"single-{trainer}")
            summary = single_process(trainer, assets, out)
            assert summary["processes"] == 1 and summary["global_step"] == 3
            cache[trainer] = load_file(out / "weights.safetensors")
        return cache[trainer]

    return get


def assert_same_weights(actual: dict, expected: dict, **tolerance) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m, n=name: f"{n}: {m}", **tolerance)


def assert_ranks_identical(summary: dict) -> None:
    """Both processes hold the same trained weights (checksums of every trainable tensor, in full precision)."""
    assert summary["processes"] == 2
    first, second = summary["checksums"]
    assert first == second


def assert_saved_folders_load_without_engine(trainer: str, assets: dict, out: Path, weights: dict) -> None:
    """What save_model wrote (and, for PPO, the recipe's policy folder) loads in plain transformers/peft and holds
    the trained weights."""
    final = out / "final"
    if trainer == "ppo":
        shared = SharedBase.from_pretrained(
            assets["base"],
            SharedBaseArguments(policy_adapter_path=str(final / "policy"), value_adapter_path=str(final / "value"),
                                reward_adapter_path=assets["reward_adapter"]),
        )  # fmt: skip
        loaded = {n: p for n, p in shared.peft_model.named_parameters() if ".lora_" in n}
        loaded.update({f"value_model.heads.value.{n}": p for n, p in shared.heads["value"].named_parameters()})
        expected = {n: w for n, w in weights.items() if ".lora_" in n or n.startswith("value_model.heads.value.")}
    elif trainer == "dpo":
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(final))
        loaded = {n: p for n, p in model.named_parameters() if ".lora_" in n}
        expected = {n: w for n, w in weights.items() if ".lora_" in n}
    else:
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(assets["reward_base"], num_labels=1)
        model = PeftModel.from_pretrained(base, str(final))
        loaded = {n: p for n, p in model.named_parameters() if ".lora_" in n}
        head = load_head(final)
        loaded["base_model.model.score.modules_to_save.default.weight"] = head.linear.weight
        expected = {n: w for n, w in weights.items() if ".lora_" in n or "modules_to_save" in n}
    assert expected, "nothing trainable found to compare"
    loaded = {n: p.detach().float() for n, p in loaded.items() if n in expected}  # e.g. not the frozen reward role
    assert_same_weights(loaded, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- DeepSpeed ZeRO-2 / ZeRO-3 vs one process


def check_engine_run(config: str, trainer: str, assets, reference, tmp_path) -> None:
    summary = launch(config, trainer, assets, tmp_path)
    if config.startswith("fsdp"):
        assert summary["engine"] == "FSDP" and summary["fsdp_version"] == 2 and summary["sharded"]
    else:
        assert summary["engine"] == "DEEPSPEED" and summary["zero_stage"] == int(config[-1])
        assert summary["sharded"] == (config == "deepspeed_zero3")  # ZeRO-2 keeps whole weights
    assert summary["global_step"] == 3
    assert_ranks_identical(summary)
    weights = load_file(tmp_path / "weights.safetensors")
    assert_same_weights(weights, reference(trainer), **TOLERANCE)
    assert_saved_folders_load_without_engine(trainer, assets, tmp_path, weights)


@requires_deepspeed
@pytest.mark.parametrize("trainer", ["ppo", "dpo", "reward"])
def test_zero3_matches_one_process(trainer, assets, reference, tmp_path):
    check_engine_run("deepspeed_zero3", trainer, assets, reference, tmp_path)


@requires_deepspeed
@pytest.mark.parametrize(
    "trainer", ["ppo", pytest.param("dpo", marks=pytest.mark.slow), pytest.param("reward", marks=pytest.mark.slow)]
)
def test_zero2_matches_one_process(trainer, assets, reference, tmp_path):
    check_engine_run("deepspeed_zero2", trainer, assets, reference, tmp_path)


# reward (default run): its final save reads the full state dict; DPO's is TRL's own FSDP save
@pytest.mark.parametrize("trainer", [pytest.param("dpo", marks=pytest.mark.slow), "reward"])
def test_accelerate_fsdp2_matches_one_process(trainer, assets, reference, tmp_path):
    """recipes/accelerate_configs/fsdp2.yaml: accelerate's own FSDP2 path (fully_shard on the decoder layers and the
    root, FULL_STATE_DICT saves), on CPU through the test-only shim."""
    check_engine_run("fsdp2", trainer, assets, reference, tmp_path)


@pytest.mark.slow
def test_accelerate_fsdp2_refuses_ppo_on_the_shared_base_before_training(assets, tmp_path):
    """Without the refusal this run trains and ends 3.2 away from the one-process run (the value head's bias) and
    ~0.03 on the adapters: the shared base's value and reward roles run outside FSDP's root forward."""
    result = run_command(launch_command("fsdp2", "ppo", assets, tmp_path), FSDP_ON_CPU)
    assert result.returncode != 0 and MARKER not in result.stdout
    assert "PPOTrainer on a SharedBase does not run under accelerate's FSDP" in result.stderr
    assert "'loss'" not in result.stdout  # refused before the first step


@requires_deepspeed
def test_zero3_checkpoint_resumes_exactly(assets, tmp_path):
    """PPO on the shared base (policy, critic and heads in one ZeRO-3 engine): 4 steps straight through, against
    2 steps, a checkpoint, and a resumed run for the other 2."""
    straight = launch("deepspeed_zero3", "ppo", assets, tmp_path / "straight", "--max_steps", "4", "--save_steps", "2")
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "value" / "head.safetensors").is_file()  # the critic beside the policy
    resumed = launch(
        "deepspeed_zero3", "ppo", assets, tmp_path / "resumed", "--max_steps", "4", "--save_steps", "2",
        "--resume_from_checkpoint", str(checkpoint),
    )  # fmt: skip
    assert straight["global_step"] == resumed["global_step"] == 4
    assert_ranks_identical(resumed)
    assert_same_weights(
        load_file(tmp_path / "resumed" / "weights.safetensors"),
        load_file(tmp_path / "straight" / "weights.safetensors"),
        rtol=0, atol=1e-6,
    )  # fmt: skip


# ---------------------------------------------------------------- FSDP2 (fully_shard) vs one process


@pytest.mark.parametrize(
    "checkpointing", [pytest.param(False, marks=pytest.mark.slow), True], ids=["plain", "gradient_checkpointing"]
)
def test_fsdp2_shared_base_matches_one_process(checkpointing, assets, tmp_path):
    extra = ["--gradient_checkpointing"] if checkpointing else []
    args = ["--base", assets["base"], "--reward_adapter", assets["reward_adapter"], *extra]
    single = run_logged([sys.executable, str(FSDP2_WORKER), *args, "--output_dir", str(tmp_path / "one")], "fsdp 1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(FSDP2_WORKER), *args,
               "--output_dir", str(tmp_path / "two")]  # fmt: skip
    sharded = run_logged(command, "fsdp2 2")
    assert single["processes"] == 1 and not single["sharded"]
    assert sharded["sharded"]  # the parameters really were DTensors
    assert_ranks_identical(sharded)
    weights = load_file(tmp_path / "two" / "weights.safetensors")
    assert_same_weights(weights, load_file(tmp_path / "one" / "weights.safetensors"), **TOLERANCE)
    # the role folders the main process wrote from the gathered state dict load without FSDP
    loaded = SharedBase.from_pretrained(
        assets["base"],
        SharedBaseArguments(policy_adapter_path=str(tmp_path / "two" / "policy"),
                            value_adapter_path=str(tmp_path / "two" / "value")),
    )  # fmt: skip
    for role in ("policy", "value"):
        for name, param in loaded._trainable[role].items():
            torch.testing.assert_close(param.detach().float(), weights[f"{role}:{name}"], rtol=0, atol=0)
