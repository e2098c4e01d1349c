"""Faults never lose work (issue 18, items 7, 8 and 10), for all four trainers.

7. A checkpoint is written to a staging folder and renamed: a kill or a full disk leaves no partial
   `checkpoint-N`; "resume from the latest" skips the partial folders older code left; a full disk says so.
8. An exception, SIGTERM or SIGINT during `train()` saves the state as of the last completed step; resuming from
   it gives the same final weights as a run that never stopped.
9/10. Every checkpoint holds `rlhf_ext_run.json`; resuming with a changed LoRA shape names the setting, resuming on
   other data warns, and a new run into an output_dir that holds checkpoints warns.
"""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from kway_records import LISTS
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from rlhf_ext.models import SharedBase, SharedBaseArguments
from rlhf_ext.testing import fraction_of_a, tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers import (
    OnlinePlackettLuceConfig,
    OnlinePlackettLuceTrainer,
    PlackettLuceDPOConfig,
    PlackettLuceDPOTrainer,
    PlackettLuceRewardConfig,
    PlackettLuceRewardTrainer,
    fault_tolerance,
)
from rlhf_ext.trainers.fault_tolerance import RUN_FILE, CheckpointWarning
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

KINDS = ["ppo", "online_kway", "kway_dpo", "kway_reward"]
COMMON = dict(report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
              logging_steps=1, learning_rate=1e-2, max_steps=4, save_strategy="no")  # fmt: skip
PROMPTS = ["abc", "hello", "xy", "qrs", "kl", "mnop", "t", "uvw"]


def left_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def build(kind: str, output_dir, *, callbacks=None, reward=fraction_of_a, lora_r: int = 4, other_data=False, **over):
    """A trainer of `kind` on a tiny model, with dropout (so a resume must restore the RNG) and 4 steps by default."""
    args = {**COMMON, "output_dir": str(output_dir), **over}
    lora = dict(r=lora_r, lora_alpha=8, lora_dropout=0.1)
    if kind in ("ppo", "online_kway"):
        data = Dataset.from_dict({"prompt": PROMPTS[::-1] if other_data else PROMPTS})
        shared = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(lora_r=lora_r, lora_alpha=8, lora_dropout=0.1))
        if kind == "ppo":
            config = PPOConfig(per_device_train_batch_size=2, max_completion_length=5, num_ppo_epochs=1, kl_coef=0.1,
                               disable_dropout=False, **args)  # fmt: skip
            trainer_class = PPOTrainer
        else:
            config = OnlinePlackettLuceConfig(per_device_train_batch_size=4, num_generations=2, max_completion_length=5,
                                              dpo_beta=0.5, disable_dropout=False, **args)  # fmt: skip
            trainer_class = OnlinePlackettLuceTrainer
        return trainer_class(shared, reward_funcs=reward, args=config, train_dataset=data,
                             processing_class=left_tokenizer(), callbacks=callbacks)  # fmt: skip
    data = Dataset.from_list(LISTS[::-1] if other_data else LISTS)
    if kind == "kway_dpo":
        config = PlackettLuceDPOConfig(per_device_train_batch_size=1, max_length=64, beta=0.5, **args)
        model = get_peft_model(tiny_causal_lm(seed=0), LoraConfig(**lora))
        return PlackettLuceDPOTrainer(model, args=config, train_dataset=data, processing_class=tiny_tokenizer(),
                                      callbacks=callbacks)  # fmt: skip
    config = PlackettLuceRewardConfig(per_device_train_batch_size=1, max_length=64, **args)
    return PlackettLuceRewardTrainer(
        model=str(build.model_path),
        args=config,
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(init_lora_weights=False, **lora),
        callbacks=callbacks,
    )


@pytest.fixture(autouse=True)
def _reward_base(model_path):
    build.model_path = model_path  # the reward trainer loads its base (with a fresh score head) from a folder


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_same_weights(got: dict, expected: dict, start: dict) -> None:
    assert got.keys() == expected.keys()
    assert any(not torch.equal(expected[n], start[n]) for n in expected), "nothing trained: a vacuous comparison"
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def checkpoints(output_dir) -> list[str]:
    """The folders in `output_dir`: checkpoints, and any staging folder a save left."""
    return sorted(p.name for p in Path(output_dir).iterdir() if p.is_dir()) if Path(output_dir).exists() else []


def is_complete(folder: Path) -> bool:
    state = folder / "trainer_state.json"
    return state.is_file() and json.loads(state.read_text())["global_step"] == int(folder.name.split("-")[-1])


@pytest.fixture
def rlhf_logs(caplog):
    """Records of rlhf_ext's loggers (transformers' logging stops propagation at its own root)."""
    caplog.set_level(logging.INFO, logger="rlhf_ext")
    return caplog


# ----------------------------------------------------------------------------- 7. interrupted checkpoints


def make_partial(output_dir, source: str, step: int, mtime_offset: float = 0.0) -> Path:
    """A checkpoint-`step` as a kill while writing it leaves with in-place writes: weights, no trainer_state.json."""
    partial = Path(output_dir) / f"checkpoint-{step}"
    shutil.copytree(Path(output_dir) / source, partial)
    (partial / "trainer_state.json").unlink()
    if mtime_offset:
        os.utime(partial, (time.time() + mtime_offset, time.time() + mtime_offset))
    return partial


@pytest.mark.parametrize("kind", KINDS)
def test_resume_latest_skips_an_interrupted_checkpoint(tmp_path, kind, rlhf_logs):
    out = tmp_path / "out"
    build(kind, out, max_steps=2, save_strategy="steps", save_steps=2).train()
    make_partial(out, "checkpoint-2", 4)
    trainer = build(kind, out, save_strategy="steps", save_steps=2)
    trainer.train(resume_from_checkpoint=True)  # before: FileNotFoundError .../checkpoint-4/trainer_state.json
    assert trainer.state.global_step == 4
    assert "checkpoint-4" in rlhf_logs.text and "trainer_state.json" in rlhf_logs.text  # what it skipped, and why
    assert f"{out / 'checkpoint-2'}" in rlhf_logs.text
    assert is_complete(out / "checkpoint-4")  # the partial folder was replaced by the complete one


def test_the_recipes_resume_from_the_latest_with_the_word_latest(tmp_path):
    out = tmp_path / "out"
    build("kway_dpo", out, max_steps=2, save_strategy="steps", save_steps=2).train()
    make_partial(out, "checkpoint-2", 4)
    trainer = build("kway_dpo", out)
    trainer.train(resume_from_checkpoint="latest")  # what `--resume_from_checkpoint latest` passes
    assert trainer.state.global_step == 4


def test_resume_latest_with_only_partial_checkpoints_says_so(tmp_path):
    out = tmp_path / "out"
    build("kway_dpo", out, max_steps=2, save_strategy="steps", save_steps=2).train()
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"(?s)no complete checkpoint.*checkpoint-2.*trainer_state.json"):
        build("kway_dpo", out).train(resume_from_checkpoint=True)


FULL_DISK_ERRORS = {
    "torch": RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"
    ),  # fmt: skip
    "errno": OSError(errno.ENOSPC, "No space left on device"),
}


# torch's form for every trainer, the OSError form (safetensors, plain files) for two
@pytest.mark.parametrize(
    ("error", "kind"), [("torch", kind) for kind in KINDS] + [("errno", "ppo"), ("errno", "kway_dpo")]
)
def test_a_full_disk_leaves_no_partial_checkpoint_and_says_so(tmp_path, monkeypatch, kind, error):
    out = tmp_path / "out"
    trainer = build(kind, out, save_strategy="steps", save_steps=2)
    save_rng_state = trainer._save_rng_state

    def disk_full_at_step_4(output_dir):
        if trainer.state.global_step == 4:
            raise FULL_DISK_ERRORS[error]
        save_rng_state(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", disk_full_at_step_4)
    with pytest.raises(OSError, match="(?i)no space left on device") as caught:
        trainer.train()
    message = str(caught.value)
    assert str(out / "checkpoint-4") in message and "checkpoint-2" in message and "intact" in message.lower()
    assert checkpoints(out) == ["checkpoint-2"]  # before: a partial checkpoint-4 (weights, no trainer state)
    assert is_complete(out / "checkpoint-2")


def test_a_kill_while_saving_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    trainer = build("kway_dpo", out, max_steps=2, save_strategy="steps", save_steps=2)

    def interrupted(output_dir):
        raise KeyboardInterrupt  # as a kill would stop it: after the weights, before the trainer state

    monkeypatch.setattr(trainer, "_save_rng_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert checkpoints(out) == []  # before: checkpoint-2 with weights and no trainer_state.json


def test_one_kill_while_saving_then_the_crash_save_writes_a_complete_checkpoint(tmp_path, monkeypatch):
    """A single interrupt inside the save (the test above interrupts every save, the crash save included): the staged
    folder is dropped, the crash handler saves the completed step again, and nothing partial is left."""
    out = tmp_path / "out"
    trainer = build("kway_dpo", out, max_steps=2, save_strategy="steps", save_steps=2)
    save_rng_state, calls = trainer._save_rng_state, []

    def interrupted_once(output_dir):
        calls.append(output_dir)
        if len(calls) == 1:
            raise KeyboardInterrupt
        save_rng_state(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert len(calls) == 2 and checkpoints(out) == ["checkpoint-2"] and is_complete(out / "checkpoint-2")
    assert not [p.name for p in out.iterdir() if p.name.startswith(fault_tolerance.STAGING_PREFIX)]


def test_a_checkpoint_is_synced_to_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    synced, renamed = [], []
    monkeypatch.setattr(fault_tolerance, "sync_path", lambda path: synced.append(Path(path)))
    rename = os.rename
    monkeypatch.setattr(fault_tolerance.os, "rename", lambda a, b: (renamed.append(len(synced)), rename(a, b)))
    build("kway_dpo", out, max_steps=2, save_strategy="steps", save_steps=2).train()
    staged = out / (fault_tolerance.STAGING_PREFIX + "checkpoint-2") / "checkpoint-2"
    files = {staged / p.relative_to(out / "checkpoint-2") for p in (out / "checkpoint-2").rglob("*")}
    assert files and files <= set(synced[: renamed[0]])  # every file and folder, before the rename
    assert synced[-1] == out  # then the rename itself


def test_rotation_never_keeps_a_partial_checkpoint_over_the_last_complete_one(tmp_path):
    out = tmp_path / "out"
    build("kway_dpo", out, max_steps=2, save_strategy="steps", save_steps=2).train()
    make_partial(out, "checkpoint-2", 6, mtime_offset=3600)  # newest by step and by mtime, yet incomplete
    trainer = build("kway_dpo", out, save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert is_complete(out / "checkpoint-4")  # before: rotation kept the partial checkpoint-6 and deleted this one
    assert not (out / "checkpoint-2").exists()
    assert (out / "checkpoint-6").exists()  # not ours to delete: a partial folder is left alone, and never resumed


# ----------------------------------------------------------------------------- 8. a crash mid-run


class Fail(TrainerCallback):
    """Raise in the middle of step `step`: after its backward, before its optimizer step."""

    def __init__(self, step: int):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise RuntimeError(f"boom in step {self.step}")


def failing_reward(step: int):
    """A reward function that raises on its `step`-th call (a judge API timing out)."""
    calls = []

    def reward(completions, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise TimeoutError("the judge API timed out")
        return fraction_of_a(completions)

    return reward


@pytest.mark.parametrize("kind", KINDS)
def test_a_crash_at_step_3_saves_step_2_and_resuming_equals_a_straight_run(tmp_path, kind, rlhf_logs):
    straight = build(kind, tmp_path / "straight")
    start = weights(straight)
    straight.train()
    out = tmp_path / "crashed"
    if kind in ("ppo", "online_kway"):  # the reward function raises at step 3, inside the rollout
        crashing, error = build(kind, out, reward=failing_reward(3)), TimeoutError
    else:  # raises in step 3 after its backward, before its optimizer step
        crashing, error = build(kind, out, callbacks=[Fail(3)]), RuntimeError
    with pytest.raises(error):
        crashing.train()
    assert checkpoints(out) == ["checkpoint-2"]  # before: output_dir empty (save_strategy="no")
    assert is_complete(out / "checkpoint-2")
    assert f"resume_from_checkpoint={str(out / 'checkpoint-2')!r}" in rlhf_logs.text
    assert "--resume_from_checkpoint" in rlhf_logs.text
    resumed = build(kind, out)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert_same_weights(weights(resumed), weights(straight), start)


def test_no_checkpoint_for_a_crash_before_the_first_step(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        build("kway_dpo", out, callbacks=[Fail(1)]).train()
    assert not [name for name in checkpoints(out) if name.startswith("checkpoint-")]


class Signal(TrainerCallback):
    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:  # mid-step: the save must wait for the step's end
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_step_end_stops_and_resumes_exactly(tmp_path, signum):
    straight = build("kway_dpo", tmp_path / "straight")
    start = weights(straight)
    straight.train()
    received = []

    def handler(received_signum, frame):
        received.append(received_signum)

    previous = signal.signal(signum, handler)
    try:
        out = tmp_path / "signalled"
        trainer = build("kway_dpo", out, callbacks=[Signal(3, signum)])
        trainer.train()
        assert signal.getsignal(signum) is handler  # train() put the handler it found back
    finally:
        signal.signal(signum, previous)
    assert trainer.state.global_step == 3  # before: the run went on to step 4 and saved nothing
    assert received == [signum]  # the handler that was there before gets the signal after the save
    assert checkpoints(out) == ["checkpoint-3"] and is_complete(out / "checkpoint-3")
    resumed = build("kway_dpo", out)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert_same_weights(weights(resumed), weights(straight), start)


# ----------------------------------------------------------------------------- 10. changed settings or data


@pytest.mark.parametrize("kind", KINDS)
def test_resume_with_another_lora_rank_names_the_setting(tmp_path, kind):
    out = tmp_path / "out"
    build(kind, out, max_steps=2, save_strategy="steps", save_steps=2).train()
    with pytest.raises(ValueError, match=r"(?s)\br\b.*4.*8"):  # before: a raw `size mismatch` from load_state_dict
        build(kind, out, lora_r=8).train(resume_from_checkpoint=True)
    assert json.loads((out / "checkpoint-2" / RUN_FILE).read_text())["settings"]


@pytest.mark.parametrize("kind", ["ppo", "kway_reward"])
def test_resume_on_other_data_warns(tmp_path, kind):
    out = tmp_path / "out"
    build(kind, out, max_steps=2, save_strategy="steps", save_steps=2).train()
    with pytest.warns(CheckpointWarning, match="(?s)train dataset.*changed"):
        build(kind, out, other_data=True).train(resume_from_checkpoint=True)


def test_resume_on_the_same_data_and_settings_is_silent(tmp_path, recwarn):
    out = tmp_path / "out"
    build("kway_dpo", out, max_steps=2, save_strategy="steps", save_steps=2).train()
    build("kway_dpo", out).train(resume_from_checkpoint=True)
    assert not [w for w in recwarn if issubclass(w.category, CheckpointWarning)]


def test_a_new_run_into_an_output_dir_with_checkpoints_warns(tmp_path):
    out = tmp_path / "out"
    build("kway_dpo", out, max_steps=2, save_strategy="steps", save_steps=2).train()
    with pytest.warns(CheckpointWarning, match=r"(?s)already holds checkpoints.*checkpoint-2.*resume_from_checkpoint"):
        build("kway_dpo", out, max_steps=1).train()


class ForeignCheckpoint(TrainerCallback):
    """At the end of step 1, a checkpoint of another run appears in output_dir, as a second run would write it."""

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 1:
            foreign = Path(args.output_dir) / "checkpoint-9"
            shutil.copytree(Path(args.output_dir) / "checkpoint-1", foreign)
            run = json.loads((foreign / RUN_FILE).read_text())
            (foreign / RUN_FILE).write_text(json.dumps({**run, "run_id": "another run"}))
            trainer_state = json.loads((foreign / "trainer_state.json").read_text())
            (foreign / "trainer_state.json").write_text(json.dumps({**trainer_state, "global_step": 9}))


def test_a_second_run_writing_into_the_same_output_dir_meanwhile_warns(tmp_path):
    out = tmp_path / "out"
    trainer = build("kway_dpo", out, max_steps=2, save_strategy="steps", save_steps=1, callbacks=[ForeignCheckpoint()])
    with pytest.warns(CheckpointWarning, match=r"(?s)Another run is writing checkpoints.*checkpoint-9"):
        trainer.train()
    first = json.loads((out / "checkpoint-1" / RUN_FILE).read_text())["run_id"]
    assert json.loads((out / "checkpoint-2" / RUN_FILE).read_text())["run_id"] == first


def test_a_resumed_run_keeps_its_run_id(tmp_path, recwarn):
    out = tmp_path / "out"
    build("kway_dpo", out, max_steps=2, save_strategy="steps", save_steps=2).train()
    build("kway_dpo", out, save_strategy="steps", save_steps=2).train(resume_from_checkpoint=True)
    ids = {json.loads((out / f"checkpoint-{s}" / RUN_FILE).read_text())["run_id"] for s in (2, 4)}
    assert len(ids) == 1
    assert not [w for w in recwarn if issubclass(w.category, CheckpointWarning)]


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_with_python_s_default_handler(tmp_path, presses):
    """One Ctrl-C: the step ends, is saved, and KeyboardInterrupt leaves train(). Two: it stops at once, unsaved."""
    out = tmp_path / "out"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        trainer = build("kway_dpo", out, callbacks=[Signal(3, signal.SIGINT) for _ in range(presses)])
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert checkpoints(out) == (["checkpoint-3"] if presses == 1 else [])


def test_resume_from_an_incomplete_folder_names_the_intact_ones(tmp_path):
    out = tmp_path / "out"
    build("kway_dpo", out, max_steps=2, save_strategy="steps", save_steps=2).train()
    make_partial(out, "checkpoint-2", 4)
    with pytest.raises(ValueError, match=r"(?s)checkpoint-4.*no trainer_state.json.*Intact checkpoints.*checkpoint-2"):
        build("kway_dpo", out).train(resume_from_checkpoint=str(out / "checkpoint-4"))


KILLED_WHILE_SAVING = """
import os, signal, sys
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from kway_records import LISTS
from rlhf_ext.testing import tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers import PlackettLuceDPOConfig, PlackettLuceDPOTrainer

torch.set_num_threads(1)
args = PlackettLuceDPOConfig(sys.argv[1], max_steps=4, per_device_train_batch_size=1, save_strategy="steps",
                             save_steps=2, use_cpu=True, bf16=False, report_to=[], disable_tqdm=True)
model = get_peft_model(tiny_causal_lm(), LoraConfig(r=4))
trainer = PlackettLuceDPOTrainer(model, args=args, train_dataset=Dataset.from_list(LISTS),
                                 processing_class=tiny_tokenizer())
save_rng_state = trainer._save_rng_state

def killed_at_step_4(output_dir):  # the weights and optimizer of checkpoint-4 are on disk, the trainer state is not
    if trainer.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng_state(output_dir)

trainer._save_rng_state = killed_at_step_4
trainer.train()
"""


def test_a_real_sigkill_while_saving_leaves_the_last_checkpoint_resumable(tmp_path, rlhf_logs):
    out = tmp_path / "out"
    # the repository root for rlhf_ext, tests/ for kway_records
    python_path = os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)])
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(out)], cwd=Path(__file__).parents[1],
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    # before: a checkpoint-4 with weights and no trainer_state.json, which resume_from_checkpoint=True picked
    assert checkpoints(out) == ["_saving-checkpoint-4", "checkpoint-2"] and is_complete(out / "checkpoint-2")
    trainer = build("kway_dpo", out, save_strategy="steps", save_steps=2)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]  # the staging folder the kill left was removed
    assert "_saving-checkpoint-4" in rlhf_logs.text


def test_the_best_checkpoint_is_recorded_where_it_is_not_where_it_was_staged(tmp_path):
    """load_best_model_at_end: Trainer looks for the best checkpoint under the folder it is saving into (staging
    here); the path recorded and loaded at the end must be the renamed one."""
    out = tmp_path / "out"
    args = PlackettLuceDPOConfig(
        **{**COMMON, "save_strategy": "steps"}, output_dir=str(out), per_device_train_batch_size=1, max_length=64,
        save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, save_total_limit=2,
        metric_for_best_model="eval_loss", greater_is_better=True,  # loss falls: best = step 1
    )  # fmt: skip
    model = get_peft_model(tiny_causal_lm(seed=0), LoraConfig(r=4, lora_alpha=8))
    data = Dataset.from_list(LISTS)
    trainer = PlackettLuceDPOTrainer(
        model, args=args, train_dataset=data, eval_dataset=data, processing_class=tiny_tokenizer()
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-1")
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-4"]  # rotation kept the best and the newest
    for name in checkpoints(out):
        assert json.loads((out / name / "trainer_state.json").read_text())["best_model_checkpoint"] == str(
            out / "checkpoint-1"
        )


def test_a_subclass_or_a_newly_recorded_setting_does_not_refuse_a_resume():
    from rlhf_ext.trainers.fault_tolerance import check_resume_fingerprint

    shapes = {"lora_A": [4, 32]}
    saved = {"settings": {"trainer": "PPOTrainer", "LoRA adapter 'policy' r": 4}, "trainable_parameters": shapes}
    current = {"settings": {"trainer": "MyPPOTrainer", "LoRA adapter 'policy' r": 4, "model head_dim": 16},
               "trainable_parameters": shapes, "train_dataset": None, "batch": None, "model_name_or_path": None}
    with pytest.warns(CheckpointWarning, match="trainer changed"):
        check_resume_fingerprint(saved, current, "ckpt")
    changed_rank = {**current, "settings": {**current["settings"], "LoRA adapter 'policy' r": 8}}
    with pytest.raises(ValueError, match="LoRA adapter 'policy' r: 4 when saved, 8 now"):
        check_resume_fingerprint(saved, changed_rank, "ckpt")
