"""Faults never lose work: atomic checkpoints, a checkpoint on a crash or a signal, and checks on resume.

`FaultTolerantMixin` goes first in the bases of every trainer of this package
(`class PPOTrainer(FaultTolerantMixin, GRPOTrainer)`); docs/faults.md says what the user sees.

- Atomic checkpoints: `checkpoint-N` is written as `_saving-checkpoint-N/checkpoint-N` and renamed into place once
  complete, so a kill or a full disk never leaves a `checkpoint-N` that resuming would pick and die on. Folders that
  older code (or another tool) left half-written are recognised (no readable `trainer_state.json`, which
  transformers writes last) and skipped by "resume from the latest" and by checkpoint rotation.
- A full disk (errno ENOSPC, or torch's `enforce fail at inline_container.cc`) becomes a `DiskFullError` that says
  so, names the checkpoint being written and the intact ones.
- An exception during `train()` saves the state as of the last completed optimizer step (weights, optimizer,
  scheduler, trainer and callback state, and the RNG state recorded at that step's end) before it propagates.
  SIGTERM/SIGINT set a flag; the step in progress finishes, a checkpoint is saved, training stops, and the signal
  is then handed to the handler that was installed before `train()`.
- Every checkpoint holds `rlhf_ext_run.json`: the settings that shape the trained weights, the trainable
  parameters' shapes, the batch settings and a fingerprint of the train dataset. Resuming with a changed shape
  setting raises a ValueError naming it before any weight is loaded; changed data or batch settings warn.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

logger = logging.getLogger(__name__)

RUN_FILE = "rlhf_ext_run.json"
TRAINER_STATE = "trainer_state.json"
# "_*" keeps the staging folder out of `checkpoint-*` globs (transformers' rotation and resume) and out of
# push_to_hub's upload of output_dir, which ignores "_*".
STAGING_PREFIX = "_saving-"
CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# How torch and safetensors report a full disk when they do not raise OSError(ENOSPC) themselves.
DISK_FULL_MESSAGES = ("No space left on device", "inline_container.cc", "PytorchStreamWriter failed",
                      "StorageFull", "os error 28", "Disk quota exceeded")  # fmt: skip
SHAPE_PEFT_KEYS = ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "exclude_modules",
                   "modules_to_save", "use_dora", "use_rslora", "bias", "rank_pattern", "alpha_pattern",
                   "layers_to_transform", "layers_pattern", "fan_in_fan_out", "target_parameters")  # fmt: skip
SHAPE_MODEL_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "num_labels")  # fmt: skip
BATCH_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "num_generations",
              "steps_per_generation")  # fmt: skip
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class CheckpointWarning(UserWarning):
    """A resume or a new run that may not do what the user expects (changed data, a used output_dir)."""


class DiskFullError(OSError):
    """The disk filled up while a checkpoint was written; the message names it and the intact checkpoints."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)


# ----------------------------------------------------------------------------- finding complete checkpoints


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is.

    transformers writes `trainer_state.json` last, so a folder without a readable one for its own step was
    interrupted while being written (by code that wrote in place) or is not a checkpoint at all.
    """
    folder = Path(folder)
    state_file = folder / TRAINER_STATE
    if not folder.is_dir():
        return "it is not a folder"
    if not state_file.is_file():
        return f"it has no {TRAINER_STATE} (it was interrupted while being written)"
    try:
        step = json.loads(state_file.read_text())["global_step"]
    except (OSError, ValueError, KeyError) as error:
        return f"its {TRAINER_STATE} is unreadable ({error})"
    match = CHECKPOINT_NAME.match(folder.name)
    if match and int(match.group(1)) != step:
        return f"its {TRAINER_STATE} is for step {step}"
    return None


def scan_checkpoints(run_dir: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints oldest step first, [(incomplete folder, why)]) among `run_dir`'s `checkpoint-N`."""
    run_dir = Path(run_dir)
    folders = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)] if run_dir.is_dir() else []
    folders.sort(key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))
    complete, incomplete = [], []
    for folder in folders:
        problem = checkpoint_problem(folder)
        if problem is None:
            complete.append(folder)
        else:
            incomplete.append((folder, problem))
    return complete, incomplete


def intact_note(run_dir: str | os.PathLike) -> str:
    """One sentence naming the complete checkpoints in `run_dir` and how to resume from the newest."""
    complete, _ = scan_checkpoints(run_dir)
    if not complete:
        return f"There is no complete checkpoint in {run_dir}."
    names = ", ".join(p.name for p in complete)
    return f"Intact checkpoints in {run_dir}: {names}; {resume_hint(complete[-1])}"


def resume_hint(checkpoint: str | os.PathLike) -> str:
    """How to resume from `checkpoint`, in the Python API and with the recipes."""
    return (f"resume with trainer.train(resume_from_checkpoint={str(checkpoint)!r}), or with the recipes "
            f"--resume_from_checkpoint {checkpoint}.")  # fmt: skip


def latest_complete_checkpoint(output_dir: str) -> str:
    """The newest complete checkpoint in `output_dir`, logging each newer folder it skipped and why.

    Replaces transformers' `get_last_checkpoint` for `resume_from_checkpoint=True`, which takes the highest step
    whether or not its folder was finished.
    """
    complete, incomplete = scan_checkpoints(output_dir)
    newest = complete[-1] if complete else None
    for folder, problem in incomplete:
        if newest is None or _step(folder) > _step(newest):
            logger.warning("Not resuming from %s: %s.", folder, problem)
    if newest is None:
        skipped = "; ".join(f"{folder.name}: {problem}" for folder, problem in incomplete)
        raise ValueError(
            f"resume_from_checkpoint=True: there is no complete checkpoint in {output_dir}"
            + (f" ({skipped})." if skipped else ".")
            + " Start without resume_from_checkpoint, or pass the path of a complete checkpoint."
        )
    logger.warning("Resuming from %s, the newest complete checkpoint in %s.", newest, output_dir)
    return str(newest)


def _step(folder: Path) -> int:
    return int(CHECKPOINT_NAME.match(folder.name).group(1))


def rotate_complete_checkpoints(run_dir: str, limit: int | None, keep: set[str]) -> None:
    """Delete the oldest complete checkpoints beyond `limit`, never one in `keep`, never an incomplete folder.

    Replaces the `rotate_checkpoints` call of Trainer._save_checkpoint, which counts half-written folders and may
    keep one of them as "the most recent" while deleting the last complete checkpoint.
    """
    if not limit or limit <= 0:
        return
    complete, _ = scan_checkpoints(run_dir)
    keep = {str(Path(k)) for k in keep if k}
    excess = len(complete) - max(limit, len(keep & {str(p) for p in complete}))
    for folder in complete:
        if excess <= 0:
            break
        if str(folder) not in keep:
            logger.info("Deleting older checkpoint %s (save_total_limit=%d).", folder, limit)
            shutil.rmtree(folder, ignore_errors=True)
            excess -= 1


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a full disk or quota, however torch or safetensors worded it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return True
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(message in str(error) for message in DISK_FULL_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_space(path: str) -> str:
    """The free space on `path`'s file system, for messages."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:,.0f} MiB"
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------- the run's fingerprint


def _jsonable(value):
    """`value` as plain JSON (sets sorted, enums by value), so that saved and current settings compare equal."""
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(getattr(value, "value", value))


def shape_settings(trainer) -> dict:
    """The settings that shape the trained weights and their optimizer state, flat, named as the messages say."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    settings = {"trainer": type(trainer).__name__}
    config = getattr(model, "config", None)
    for key in SHAPE_MODEL_KEYS:
        if getattr(config, key, None) is not None:
            settings[f"model {key}"] = _jsonable(getattr(config, key))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    for adapter, peft_config in (getattr(model, "peft_config", None) or {}).items():
        if not any(f".{adapter}." in name for name in trainable):
            continue  # a frozen adapter (the PPO reward role) is read from its own folder again, not from checkpoints
        values = peft_config.to_dict() if hasattr(peft_config, "to_dict") else vars(peft_config)
        for key in SHAPE_PEFT_KEYS:
            if key in values:
                settings[f"LoRA adapter {adapter!r} {key}"] = _jsonable(values[key])
    shared_base = getattr(trainer, "shared_base", None)
    if shared_base is not None and getattr(shared_base, "value_layout", None) is not None:
        settings["value_layout"] = shared_base.value_layout
    return settings


def trainable_shapes(trainer) -> dict | None:
    """{name: shape} of the trainable parameters; None when sharded (ZeRO-3/FSDP hold a slice of each)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    shapes = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            shape = tuple(getattr(param, "ds_shape", param.shape))
            if not shape or 0 in shape:
                return None
            shapes[name] = list(shape)
    return shapes


def dataset_fingerprint(dataset, samples: int = 64) -> dict | None:
    """Length, columns and a hash of the first, last and evenly spread records of `dataset`.

    Content, not datasets' `_fingerprint`: an in-memory Dataset gets a random one in every process, so identical
    data would look changed. Sampling keeps it cheap on large data; a change only in records between the samples
    goes unnoticed.
    """
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return None
    length = len(dataset)
    picks = sorted(set(range(min(samples, length))) | set(range(max(length - samples, 0), length))
                   | set(np.linspace(0, length - 1, num=min(samples, length), dtype=int).tolist()))  # fmt: skip
    digest = hashlib.sha256()
    for index in picks:
        digest.update(json.dumps(dataset[index], sort_keys=True, default=_record_value).encode())
    columns = getattr(dataset, "column_names", None)
    return {"records": length, "columns": columns, "sha256": digest.hexdigest()}


def _record_value(value):
    """A JSON stand-in for a record value json cannot write: arrays and tensors by content, images by their bytes;
    never a repr, which may hold a memory address that changes every run."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "tobytes"):
        return hashlib.sha256(value.tobytes()).hexdigest()
    return type(value).__name__


def run_fingerprint(trainer) -> dict:
    """What `rlhf_ext_run.json` holds: see the module docstring."""
    args = trainer.args
    batch = {key: getattr(args, key) for key in BATCH_KEYS if getattr(args, key, None) is not None}
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "format": 1,
        "settings": shape_settings(trainer),
        "trainable_parameters": trainable_shapes(trainer),
        "batch": batch,
        "model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "train_dataset": _safe_dataset_fingerprint(trainer.train_dataset),
    }


def _safe_dataset_fingerprint(dataset) -> dict | None:
    """`dataset_fingerprint`, or None (no data check on resume) for data it cannot read: a check must never stop a
    run that would otherwise train."""
    try:
        return dataset_fingerprint(dataset)
    except Exception as error:  # records of any type, datasets of any class
        logger.info("No fingerprint of the train dataset (%s: %s); resuming will not compare the data.",
                    type(error).__name__, error)  # fmt: skip
        return None


def check_resume_fingerprint(saved: dict, current: dict, checkpoint: str) -> None:
    """Raise before any weight is loaded when a shape setting changed since `checkpoint`; warn on changed data."""
    old, new = saved.get("settings", {}), current["settings"]
    # Only the settings both records hold: a key a later version records (or a config attribute an upgrade gives a
    # default) must not refuse every older checkpoint. The trainer's class is not a shape: a subclass (extra logging)
    # resumes its parent's checkpoints; it only warns. The trainable shapes below catch a real mismatch either way.
    changed = [f"{key}: {old[key]!r} when saved, {new[key]!r} now"
               for key in sorted(set(old) & set(new) - {"trainer"}) if old[key] != new[key]]  # fmt: skip
    _warn_if_changed("trainer", old.get("trainer"), new.get("trainer"), checkpoint,
                     "its shapes are checked below; make sure it is the run you meant to resume.")  # fmt: skip
    old_shapes, new_shapes = saved.get("trainable_parameters"), current["trainable_parameters"]
    if not changed and old_shapes is not None and new_shapes is not None and old_shapes != new_shapes:
        differ = [
            name for name in sorted(set(old_shapes) | set(new_shapes)) if old_shapes.get(name) != new_shapes.get(name)
        ]
        changed = [f"trainable parameter {name}: {old_shapes.get(name, 'absent')} when saved, "
                   f"{new_shapes.get(name, 'absent')} now" for name in differ[:5]]  # fmt: skip
    if changed:
        raise ValueError(
            f"Cannot resume from {checkpoint}: settings that shape the trained weights changed since it was saved: "
            + "; ".join(changed)
            + ". Resume with the settings it was saved with, or start a new run in another output_dir."
        )
    _warn_if_changed("train dataset", saved.get("train_dataset"), current["train_dataset"], checkpoint,
                     "the resumed run skips the records the saved run trained on by position, so it would skip "
                     "different ones.")  # fmt: skip
    _warn_if_changed(
        "batch settings",
        saved.get("batch"),
        current["batch"],
        checkpoint,
        "the resumed run skips the batches already trained by count, which now hold other records.",
    )
    _warn_if_changed(
        "model",
        saved.get("model_name_or_path"),
        current["model_name_or_path"],
        checkpoint,
        "its shapes match, so the checkpoint loads; make sure it is the same model.",
    )


def _warn_if_changed(what: str, old, new, checkpoint: str, consequence: str) -> None:
    if old is not None and new is not None and old != new:
        warnings.warn(f"Resuming from {checkpoint}: the {what} changed since it was saved ({old} then, {new} now): "
                      f"{consequence}", CheckpointWarning, stacklevel=4)  # fmt: skip


# ----------------------------------------------------------------------------- RNG, steps and signals


def rng_snapshot() -> dict:
    """The RNG states `Trainer._save_rng_state` saves (python, numpy, torch CPU, CUDA)."""
    snapshot = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snapshot["cuda"] = torch.cuda.get_rng_state_all()
    return snapshot


def set_rng(snapshot: dict) -> None:
    random.setstate(snapshot["python"])
    np.random.set_state(snapshot["numpy"])
    torch.random.set_rng_state(snapshot["cpu"])
    if "cuda" in snapshot:
        torch.cuda.set_rng_state_all(snapshot["cuda"])


@contextlib.contextmanager
def rng_as(snapshot: dict | None):
    """The RNG set to `snapshot` inside, and back to its state on entry after."""
    if snapshot is None:
        yield
        return
    now = rng_snapshot()
    set_rng(snapshot)
    try:
        yield
    finally:
        set_rng(now)


class StepWatch(TrainerCallback):
    """Where the training loop is, the RNG at the last step's end, and a pending stop signal.

    Added last, so its `on_pre_optimizer_step` runs after every other callback's: an exception before it marks the
    update as begun cannot have changed a weight.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.phase = None  # None: no step began in this train(); "step", "optimizer", then "between" at its end
        self.rng = None
        self.signal = None
        self.forced = False

    def on_step_begin(self, args, state, control, **kwargs):
        self.phase = "step"

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.phase = "optimizer"

    def on_step_end(self, args, state, control, **kwargs):
        self.phase = "between"
        # What a save at this step would record; a crash later in the next step saves this, not its own RNG.
        self.rng = rng_snapshot()
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


def deliver(signum: int, handler) -> None:
    """Hand `signum` to `handler` as if it had arrived now: call it, or for SIG_DFL re-raise the signal."""
    if callable(handler):
        handler(signum, None)
    elif handler in (signal.SIG_DFL, None):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def stop_on_signals(watch: StepWatch, previous: dict, enabled: bool):
    """SIGTERM/SIGINT set `watch.signal` (saved and stopped at the step end); a second one stops at once."""
    if not enabled:
        yield
        return

    def handler(signum, frame):
        if watch.signal is None:
            watch.signal = signum
            logger.warning("Received %s: finishing this step, saving a checkpoint, then stopping (send it again to "
                           "stop at once, without a checkpoint).", signal.Signals(signum).name)  # fmt: skip
            return
        watch.forced = True
        for sig, old in previous.items():
            signal.signal(sig, old)
        deliver(signum, previous[signum])

    previous.update({sig: signal.getsignal(sig) for sig in SIGNALS})
    for sig in SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- the mixin


class FaultTolerantMixin:
    """Atomic checkpoints, a checkpoint on a crash or a signal, and checks on resume, for any transformers Trainer.

    Put it first in the bases: `class PPOTrainer(FaultTolerantMixin, GRPOTrainer)`.
    """

    _staging_run_dir: str | None = None
    _deferred_push: bool = False

    # ------------------------------------------------------------ train

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """Trainer.train, resuming from the newest complete checkpoint and saving one on a crash or a signal.

        `resume_from_checkpoint` may also be "latest" (or "true"), for the recipes' `--resume_from_checkpoint`.
        """
        resume = self._resolve_resume(resume_from_checkpoint)
        self._fingerprint = run_fingerprint(self)
        # The run's identity: kept across resumes, so that checkpoints written by another run are recognised.
        self._fingerprint["run_id"] = uuid.uuid4().hex
        self._train_started, self._other_writers = time.time(), set()
        self._check_before_training(resume)
        watch = self._step_watch()
        previous = {}
        try:
            with stop_on_signals(watch, previous, enabled=self._can_stop_on_signals()):
                output = super().train(resume_from_checkpoint=resume, trial=trial, **kwargs)
        except BaseException as error:
            self._save_after_crash(error, trial, watch)
            raise
        if watch.signal is not None:
            self._after_signal(trial, watch, previous)
        return output

    def _resolve_resume(self, resume):
        """The checkpoint path to resume from (None for a fresh run); a clear error for an incomplete one."""
        if isinstance(resume, str) and resume.lower() in ("latest", "true") and not os.path.isdir(resume):
            resume = True
        if resume is True:
            return latest_complete_checkpoint(self.args.output_dir)
        if resume in (None, False):
            return None
        problem = checkpoint_problem(resume)
        if problem is not None:
            raise ValueError(f"Cannot resume from {resume}: {problem}. {intact_note(Path(resume).parent)}")
        return resume

    def _check_before_training(self, resume: str | None) -> None:
        """Compare with the checkpoint's fingerprint when resuming; warn when a new run shares an output_dir."""
        if self.args.should_save:
            self._remove_stale_staging(self._get_output_dir(None))
        if resume is not None:
            saved = Path(resume) / RUN_FILE
            if saved.is_file():
                saved = json.loads(saved.read_text())
                check_resume_fingerprint(saved, self._fingerprint, resume)
                self._fingerprint["run_id"] = saved.get("run_id", self._fingerprint["run_id"])
            else:
                logger.info("%s has no %s (saved by older code): settings and data not compared.", resume, RUN_FILE)
            return
        if not self.args.should_save:
            return
        run_dir = self._get_output_dir(None)
        complete, incomplete = scan_checkpoints(run_dir)
        if complete or incomplete:
            names = ", ".join(p.name for p in complete + [f for f, _ in incomplete])
            # A warning, not a refusal: transformers 5 has no overwrite_output_dir to opt in with, and re-running
            # a command into the same folder is common. The risks are named instead.
            warnings.warn(
                f"output_dir {run_dir} already holds checkpoints ({names}) and this run does not resume from them: "
                "its checkpoints will overwrite those of the same step, save_total_limit may delete the others, and "
                "resume_from_checkpoint=True will later pick whichever is newest. To continue that run pass "
                "resume_from_checkpoint=True (--resume_from_checkpoint latest); to start afresh use another "
                "output_dir or delete them.",
                CheckpointWarning, stacklevel=3,
            )  # fmt: skip

    def _remove_stale_staging(self, run_dir: str) -> None:
        """Delete the staging folders of saves a kill interrupted (never a `checkpoint-N`)."""
        if not os.path.isdir(run_dir):
            return
        for name in os.listdir(run_dir):
            if name.startswith(STAGING_PREFIX):
                logger.warning(
                    "Removing %s, left by a checkpoint save that was interrupted.", os.path.join(run_dir, name)
                )
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)

    def _step_watch(self) -> StepWatch:
        """The StepWatch callback, added once (last) and reset for this train()."""
        watch = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, StepWatch)), None)
        if watch is None:
            watch = StepWatch()
            self.add_callback(watch)
        watch.reset()
        return watch

    def _can_stop_on_signals(self) -> bool:
        # Signal handlers only install in the main thread. Under several processes each would catch the signal at
        # its own step and the checkpoint's collective save would hang, so there the launcher's handling stays.
        return threading.current_thread() is threading.main_thread() and self.args.world_size <= 1

    # ------------------------------------------------------------ crash and signal

    def _why_no_crash_save(self, error: BaseException, watch: StepWatch) -> str | None:
        """Why the state after the last completed step cannot (or need not) be saved, or None."""
        step = self.state.global_step
        if watch.forced:
            return "training was stopped at once by a second signal"
        if self.args.world_size > 1:
            return ("the run is distributed: the other processes may be at another point, and a save needs all of "
                    "them (save_steps bounds what a crash loses there)")  # fmt: skip
        if watch.phase is None or step == 0:
            return "no training step completed in this run"
        if watch.phase == "optimizer":
            return (f"it came while the optimizer was updating the weights for step {step + 1}, so weights, "
                    "optimizer and step counter may disagree")  # fmt: skip
        if is_disk_full(error):
            return "the disk is full"
        path = os.path.join(self._get_output_dir(None), f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if checkpoint_problem(path) is None:
            return f"{path} already holds step {step}; {resume_hint(path)}"
        return None

    def _save_after_crash(self, error: BaseException, trial, watch: StepWatch) -> None:
        """Save the state after the last completed step, log where and how to resume; never raise."""
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"failed ({type(error).__name__}: {error})"
        reason = self._why_no_crash_save(error, watch)
        if reason is not None:
            # A DiskFullError's own message already names the intact checkpoints.
            note = "" if isinstance(error, DiskFullError) else intact_note(self._get_output_dir(trial))
            logger.error("Training %s; no checkpoint saved: %s. %s", what, reason, note)
            return
        step = self.state.global_step
        try:
            with rng_as(watch.rng):  # the RNG as the step ended, not as the failed one left it
                self._save_checkpoint(self.model_wrapped, trial)
        except Exception as save_error:  # the original error matters more: it is re-raised by train()
            logger.error("Training %s, and saving the state after step %d failed too: %s", what, step, save_error)
            return
        path = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{step}")
        when = f"during step {step + 1}" if watch.phase == "step" else f"after step {step}"
        logger.error("Training %s %s. Saved the state after step %d, the last completed, to %s: %s%s",
                     what, when, step, path, resume_hint(path), self._mid_rollout_note())  # fmt: skip

    def _mid_rollout_note(self) -> str:
        """For TRL's GRPO-based trainers: a checkpoint inside a rollout's update cycle resumes on a fresh rollout."""
        every = getattr(self.args, "steps_per_generation", None) and self.args.steps_per_generation * getattr(
            self, "num_iterations", 1
        )
        if not every or every <= 1 or self.state.global_step % every == 0:
            return ""
        # GRPOTrainer does not save its buffered rollout; on resume it generates a new one (as for any checkpoint
        # saved at such a step), so the resumed run continues correctly but not identically to an unbroken one.
        return (
            f" Step {self.state.global_step} is inside a rollout's {every} update steps: the resumed run "
            "generates a new rollout there, so it will not repeat the unbroken run exactly."
        )

    def _after_signal(self, trial, watch: StepWatch, previous: dict) -> None:
        """After training stopped for a signal: make sure the last step is saved, then hand the signal on."""
        step = self.state.global_step
        path = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if step > 0 and checkpoint_problem(path) is not None:  # the signal came after the last step's end
            self._save_checkpoint(self.model_wrapped, trial)
        name = signal.Signals(watch.signal).name
        logger.warning("Stopped by %s after step %d, saved to %s: %s", name, step, path, resume_hint(path))
        deliver(watch.signal, previous.get(watch.signal, signal.SIG_DFL))

    # ------------------------------------------------------------ atomic checkpoints

    def _get_output_dir(self, trial):
        # Extends Trainer._get_output_dir: while `_save_checkpoint` runs, Trainer and TRL build the checkpoint's
        # path (and the folder they rotate) from it, so pointing it at the staging folder stages every file they
        # write, TRL's extra ones included, without copying their code.
        if self._staging_run_dir is not None:
            return self._staging_run_dir
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Extends Trainer._push_from_checkpoint: the upload runs in the background, so it must read the renamed
        # folder, not the staging one; `_save_checkpoint` pushes after the rename.
        if self._staging_run_dir is not None:
            self._deferred_push = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer._save_checkpoint (and TRL's override), written to a staging folder and renamed when complete.

        Wraps rather than replaces Trainer._save_checkpoint, whose in-place writes left a `checkpoint-N` without
        `trainer_state.json` on a kill or a full disk. Its own rotation runs on the staging folder (a no-op);
        rotation of complete checkpoints runs after the rename.
        """
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging = os.path.join(run_dir, name), os.path.join(run_dir, STAGING_PREFIX + name)
        if self.args.should_save and os.path.exists(staging):
            shutil.rmtree(staging)
        self._staging_run_dir, self._deferred_push = staging, False
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                self._finish_staged(run_dir, os.path.join(staging, name))
        except BaseException as error:
            self._staging_run_dir = None
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # frees the space a full disk needs back
            if is_disk_full(error):
                raise DiskFullError(
                    f"No space left on device while writing {final} ({first_line(error)}; {free_space(run_dir)} "
                    f"free now that the partial checkpoint is removed). {intact_note(run_dir)}"
                ) from error
            raise
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()  # every process has written its files (RNG, shards) into staging
        if self.args.should_save:
            publish(os.path.join(staging, name), final)
            os.rmdir(staging)
            keep = {final, self.state.best_model_checkpoint}
            rotate_complete_checkpoints(run_dir, self.args.save_total_limit, keep)
            self._warn_if_another_run_writes(run_dir)
        self.accelerator.wait_for_everyone()
        if self._deferred_push:
            super()._push_from_checkpoint(final)

    def _warn_if_another_run_writes(self, run_dir: str) -> None:
        """Warn once per run when checkpoints of another run appear in `run_dir` while this one trains.

        Two runs started together into one output_dir each see it empty at the start; their checkpoints interleave,
        rotation deletes each other's, and "resume from the latest" may pick the other run's.
        """
        own = getattr(self, "_fingerprint", {}).get("run_id")
        started = getattr(self, "_train_started", None)
        if own is None or started is None:
            return
        for folder in scan_checkpoints(run_dir)[0]:
            try:
                other = json.loads((folder / RUN_FILE).read_text()).get("run_id")
            except (OSError, ValueError):
                continue
            if other and other != own and other not in self._other_writers and folder.stat().st_mtime >= started:
                self._other_writers.add(other)
                warnings.warn(
                    f"Another run is writing checkpoints into {run_dir} while this one trains ({folder.name} is "
                    "not this run's): their checkpoints replace each other's, save_total_limit deletes them, and "
                    "resume_from_checkpoint=True may pick the wrong run's. Give each run its own output_dir.",
                    CheckpointWarning, stacklevel=2,
                )  # fmt: skip

    def _finish_staged(self, run_dir: str, staged: str) -> None:
        """Point best_model_checkpoint at the final folder and write the run's fingerprint, before the rename."""
        best_step = self.state.best_global_step
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and best_step:
            # Trainer looked for the best checkpoint in the staging folder; look where it really is.
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
            if best_step == self.state.global_step or os.path.exists(best):
                self.state.best_model_checkpoint = best
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE))
        fingerprint = getattr(self, "_fingerprint", None) or run_fingerprint(self)
        with open(os.path.join(staged, RUN_FILE), "w") as f:
            json.dump(fingerprint, f, indent=1)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def sync_tree(folder: str) -> None:
    """fsync every file under `folder`, then every folder (their entries), deepest first.

    A rename is atomic but not durable: after a power loss or a kernel crash the renamed checkpoint could hold files
    whose data never reached the disk. Syncing before the rename makes "checkpoint-N exists" imply "its bytes do".
    """
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            sync_path(os.path.join(root, name))
        sync_path(root)


def sync_path(path: str) -> None:
    """fsync one file or folder (a folder's fsync makes its entries durable, e.g. a rename into it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(staged: str, final: str) -> None:
    """Rename the complete `staged` folder to `final` (atomic on one file system), durably (`sync_tree`).

    A `final` already there (a folder older code left half-written, or a checkpoint of the same step from an earlier
    run) is moved aside first and deleted after, so `final` is at every moment absent or complete.
    """
    sync_tree(staged)
    if os.path.exists(final):
        aside = os.path.join(os.path.dirname(final), STAGING_PREFIX + "replaced-" + os.path.basename(final))
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        os.rename(staged, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(staged, final)
    sync_path(os.path.dirname(final))
