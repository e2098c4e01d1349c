"""Peak memory and time of one RLHF step at a real model size (>= 1B parameters) on a CPU: rlhf_ext vs TRL 1.12.

The base has the shape of a real 1-2B model, built from config with random weights (no download), saved ONCE as
bfloat16 safetensors (as the Hub ships these models) with a word-level tokenizer of its vocabulary size, into
`<work_dir>/<size>/` and reused by later runs (`--size` names a shape of benchmarks/harness.py). Each configuration
runs in its own process (this module with `--child`, a child run of benchmarks/harness.py), so its peak RSS
(ru_maxrss) is its own, under an address-space limit (`--memory_limit_gb`, RLIMIT_AS) so that an out-of-memory ends
that configuration only and is reported as one:

    ppo_shared_{4bit,bf16,fp32}_{ckpt,nockpt}
                    one PPO update of `rlhf_ext.trainers.PPOTrainer` on a `SharedBase` (policy and value LoRA
                    adapters r=16, a frozen reward adapter + head loaded from a role folder, reference = adapters
                    off): generation + scoring + one optimizer step, gradient checkpointing on or off. The 4-bit base
                    (NF4) computes in float32 unless --dtype says otherwise
    kway_dpo_{fp32,bf16}
                    one `PlackettLuceDPOTrainer` step on a peft LoRA model of the same base (K completions per
                    prompt, reference = adapters off), gradient checkpointing on (TRL's default)
    kway_reward_{fp32,bf16}
                    one `PlackettLuceRewardTrainer` step (LoRA through `peft_config`; the trainer makes it SEQ_CLS,
                    so the score head trains), gradient checkpointing on
    kway_{dpo,reward}_{fp32,bf16}_unshared
                    the same with `shared_prompt=False`: K rows per list, each holding the prompt (the rows above
                    run the default, None: each list's prompt computed once where exact). Not in the default
                    set; name them in --configs. Each row's JSON records `shared_prompt` and whether the trainer
                    shared (`shared_prompt_active`)
    trl112_ppo      TRL 1.12's `trl.experimental.ppo.PPOTrainer` (its last PPO) in its layout: policy, reference,
                    value and reward as four full float32 models, policy and value fully trained, in a virtual
                    environment with trl 1.12.0 over this one's packages (created by benchmarks/harness.py's
                    `trl_baseline_python`). At 1B it is not expected to fit in 24 GiB: the row says where it ran out
                    of memory

All trainers run with `use_cpu=True`, `bf16=False` (no autocast: a bf16 configuration computes in the bf16 weights),
batch 2 prompts (K-way: 2 lists of K=4), ~64-token prompts, 32-token completions. `--steps` optimizer steps are
timed, all of them (default 1, no warm-up: at 1B one step takes minutes, and the first step is the one that
allocates the optimizer state, so it is the peak). Times: wall and CPU seconds per step (the median over the
steps), the rollout (generation + scoring) and generation alone for PPO; `load s` is loading the model (and
quantizing it). The "estimate" column is `rlhf_ext.memory.estimate(...)` when that module exists ("-" otherwise).
The table goes to stdout, a progress line per configuration to stderr, and every result with the configuration's
parameters (bits, dtype, checkpointing, batch, lengths, lora_r, parameter count) to `--output` as JSON (default
benchmarks/results/real_size-<size>.json). From the repository root:

    .venv/bin/python -m benchmarks.real_size                  # Llama-3.2-1B's shape (1.24B), every configuration
    .venv/bin/python -m benchmarks.real_size --size tiny      # smoke test: every configuration in ~2 minutes
    .venv/bin/python -m benchmarks.real_size --size smollm2-1.7b --configs ppo_shared_4bit_ckpt trl112_ppo
    .venv/bin/python -m benchmarks.real_size --configs ppo_shared_fp32_ckpt --steps 3 --output /tmp/fp32.json
    .venv/bin/python -m benchmarks.real_size --configs kway_dpo_fp32 kway_dpo_fp32_unshared --threads 1 --steps 2

Run the 1B measurement alone on the machine: 2 threads per configuration (`--threads`) use both cores, and with
another job on the CPU their OpenMP barriers spin-wait (CPU time ~ wall time, both several times too long); a
configuration's peak RSS is what the machine must have free. The address-space limit counts ~1.8 GiB more than
the resident set (thread stacks, allocator arenas, the memory-mapped checkpoint; the JSON has each child's VmPeak),
so 22 GiB leaves ~20 GiB of RSS. The first run also writes the 2.5 GB checkpoint (~1 minute).

Expected time at 1B, 2 threads (an extrapolation, not a measurement: from SmolLM2-135M's shape here, 12.5 CPU s
per PPO update and 15 CPU s per K-way DPO step at 1 thread, scaled by the 9x matmul parameters): 1-1.5 minutes
per step plus ~1 minute to start and load, so 2-3 minutes per configuration and 25-35 minutes for all of them;
trl112_ppo ends while loading its models. The 4-bit rows may take longer: bitsandbytes dequantizes every weight on
every forward, each of the 32 generation steps included.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from benchmarks.harness import (
    DEFAULT_TRL_VENV,
    RESULTS_DIR,
    SHAPES,
    ChildFailed,
    Clock,
    Lap,
    add_result_file_argument,
    median_lap,
    model_config,
    peak_rss_gib,
    proc_status_gib,
    run_child,
    training_timer,
    trl_baseline_python,
    write_json,
)

DEFAULT_SIZE = "llama-3.2-1b"
CHECKPOINT_DTYPE = "bfloat16"  # what the Hub ships for these models; the fp32 configurations upcast at load
PAD, BOS, EOS = 0, 1, 2
DONE_MARK = "complete.json"
DTYPE_BITS = {"float32": 32, "bfloat16": 16}


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One row of the table: which trainer, on which base precision, with or without checkpointing."""

    name: str
    stage: str | None  # the stage `rlhf_ext.memory.estimate` takes: "ppo", "dpo", "reward"; None: no estimate
    bits: int  # 4, 16 or 32: the base weights
    dtype: str  # compute dtype (a 4-bit base's is --dtype)
    gradient_checkpointing: bool
    trainer: str
    shared_prompt: bool | None = None  # the K-way trainers' config field (None: shared where exact; False: off)


def configurations(dtype_4bit: str) -> dict[str, Configuration]:
    """Every configuration, by name, in the order they run."""
    rows = []
    for base in ("4bit", "bf16", "fp32"):
        dtype = {"4bit": dtype_4bit, "bf16": "bfloat16", "fp32": "float32"}[base]
        bits = 4 if base == "4bit" else DTYPE_BITS[dtype]
        for ckpt in (True, False):
            rows.append(Configuration(f"ppo_shared_{base}_{'ckpt' if ckpt else 'nockpt'}", "ppo", bits, dtype, ckpt,
                                      "rlhf_ext PPOTrainer on SharedBase"))  # fmt: skip
    for stage, trainer, name in (("dpo", "PlackettLuceDPOTrainer", "kway_dpo"),
                                 ("reward", "PlackettLuceRewardTrainer", "kway_reward")):  # fmt: skip
        for base, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
            rows.append(Configuration(f"{name}_{base}", stage, DTYPE_BITS[dtype], dtype, True, f"{trainer} + LoRA"))
            rows.append(Configuration(f"{name}_{base}_unshared", stage, DTYPE_BITS[dtype], dtype, True,
                                      f"{trainer} + LoRA, shared_prompt=False", shared_prompt=False))  # fmt: skip
    # TRL 1.12's PPOConfig defaults to gradient checkpointing (of the policy only; the value model keeps activations)
    rows.append(Configuration("trl112_ppo", None, 32, "float32", True, "trl 1.12.0 PPOTrainer, four full models"))
    return {row.name: row for row in rows}


CONFIG_NAMES = list(configurations("float32"))
DEFAULT_CONFIGS = [name for name in CONFIG_NAMES if not name.endswith("_unshared")]  # the twins run when named


# -- the base on disk, the tokenizer and the data ----------------------------------------------------------------


def llama_config(size: str):
    """A LlamaConfig of the shape `size` (benchmarks/harness.py), pad/bos/eos = 0/1/2."""
    return model_config(size, max_position_embeddings=2048, rms_norm_eps=1e-5, pad_token_id=PAD, bos_token_id=BOS,
                        eos_token_id=EOS)  # fmt: skip


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with one token per vocabulary entry ("w3" ... "w<V-1>", split on whitespace).

    Every id of the model's vocabulary decodes to a word and re-tokenizes to one token, so the text round trip
    of PPO's reward scoring keeps the lengths, which a character tokenizer of a few ids would not."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>")  # fmt: skip


def random_words(count: int, length: int, vocab_size: int, seed: int) -> list[str]:
    """`count` texts of `length` random word tokens each (no special tokens)."""
    import torch

    ids = torch.randint(3, vocab_size, (count, length), generator=torch.Generator().manual_seed(seed))
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def ppo_prompts(count: int, prompt_length: int, vocab_size: int) -> list[str]:
    # the trailing space keeps the decoded completion a separate word when the reward re-tokenizes prompt + completion
    return [text + " " for text in random_words(count, prompt_length, vocab_size, seed=0)]


def ranked_lists(count: int, k: int, prompt_length: int, completion_length: int, vocab_size: int) -> list[dict]:
    """`count` ranked records (best first): the trainers append EOS, so each completion is completion_length tokens."""
    prompts = ppo_prompts(count, prompt_length, vocab_size)
    completions = random_words(count * k, completion_length - 1, vocab_size, seed=1)
    return [{"prompt": p, "completions": completions[i * k : (i + 1) * k]} for i, p in enumerate(prompts)]


def cache_paths(work_dir: Path, size: str, lora_r: int) -> tuple[Path, Path]:
    """(base folder, reward role folder) of `size` in the cache."""
    folder = work_dir / f"{size}-{CHECKPOINT_DTYPE}"
    return folder / "base", folder / f"reward_role_r{lora_r}"


def prepare_cache(size: str, base_dir: Path, reward_dir: Path, lora_r: int) -> dict:
    """Save the random base (+ tokenizer) and a reward role folder for it, each only if not there yet; the base's
    record ({"size", "parameters"})."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head

    silence_libraries()
    if not (base_dir / DONE_MARK).exists():
        torch.manual_seed(0)
        config = llama_config(size)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, CHECKPOINT_DTYPE))
        model.save_pretrained(base_dir)
        word_tokenizer(config.vocab_size).save_pretrained(base_dir)
        params = sum(p.numel() for p in model.parameters())
        (base_dir / DONE_MARK).write_text(json.dumps({"size": size, "parameters": params}))
        del model
    if not (reward_dir / DONE_MARK).exists():
        # the reward role the PPO configurations load: an adapter + head folder as the K-way reward trainer saves it
        args = SharedBaseArguments(lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, dtype=CHECKPOINT_DTYPE)
        donor = SharedBase.from_pretrained(str(base_dir), args)
        save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], reward_dir, "reward")
        (reward_dir / DONE_MARK).write_text("{}")
    return json.loads((base_dir / DONE_MARK).read_text())


# -- child: one configuration in this process ---------------------------------------------------------------------

_stage = "start"


def stage(name: str) -> None:
    """Mark what the child is doing, so an out-of-memory can say where it happened (also from a hard crash)."""
    global _stage
    _stage = name
    print(f"STAGE {name}", file=sys.stderr, flush=True)


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux: VmHWM) so that the next reading is the peak of what follows,
    not of loading; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def train_with_step_peak(trainer) -> dict:
    """trainer.train() with the peak resident set of training alone (VmHWM reset first) and the RSS before it."""
    import gc

    gc.collect()
    before = proc_status_gib("VmRSS")
    reset = reset_peak_rss()
    trainer.train()
    return {"rss_before_train_gib": before, "train_peak_rss_gib": proc_status_gib("VmHWM") if reset else None}


def timed_steps(timer) -> list[dict[str, float]]:
    """The wall and CPU seconds of every optimizer step (one PPO update here) a `training_timer` recorded."""
    return [lap._asdict() for lap in timer.laps]


def time_method(obj, name: str, record: dict) -> None:
    """Wrap `obj.name` so each call adds its wall seconds, and the peak RSS after it, to `record[name]`."""
    method = getattr(obj, name)
    calls = record.setdefault(name, [])

    def timed(*args, **kwargs):
        clock = Clock()
        out = method(*args, **kwargs)
        calls.append({"wall_s": clock.lap().wall_s, "peak_rss_gib": peak_rss_gib()})
        return out

    setattr(obj, name, timed)


def common_trainer_args(cli, output_dir: str) -> dict:
    return dict(output_dir=output_dir, per_device_train_batch_size=cli.batch, gradient_accumulation_steps=1,
                max_steps=cli.steps, report_to=[], bf16=False, use_cpu=True, save_strategy="no",
                logging_steps=10**6, disable_tqdm=True, seed=0)  # fmt: skip


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_settings(trainer, config) -> dict:
    """What actually trained, and with which checkpointing, as the trainer set it up."""
    return {"trainable_parameters": trainable_parameters(trainer.model),
            "gradient_checkpointing_used": config.gradient_checkpointing,
            "gradient_checkpointing_kwargs": config.gradient_checkpointing_kwargs}  # fmt: skip


def child_ppo_shared(spec: Configuration, cli, output_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from benchmarks.ppo_vs_trl import PPO  # the same PPO hyperparameters as the 135M comparison
    from rlhf_ext.models import SharedBase, SharedBaseArguments
    from rlhf_ext.trainers.ppo.config import PPOConfig
    from rlhf_ext.trainers.ppo.trainer import PPOTrainer

    runtime = {"runtime_rss_gib": proc_status_gib("VmRSS")}  # the process before any model
    stage("load base")
    clock = Clock()
    args = SharedBaseArguments(lora_r=cli.lora_r, lora_alpha=2 * cli.lora_r, lora_dropout=0.0, dtype=spec.dtype,
                               load_in_4bit=spec.bits == 4, reward_adapter_path=cli.reward_dir,
                               policy_lm_head=cli.policy_lm_head)  # fmt: skip
    shared = SharedBase.from_pretrained(cli.base_dir, args)
    tokenizer = AutoTokenizer.from_pretrained(cli.base_dir, padding_side="left")
    load_s = clock.lap().wall_s
    loaded = {**runtime, "rss_after_load_gib": proc_status_gib("VmRSS"), "adapter_dtype": str(shared.adapter_dtype)}
    stage("trainer init")
    config = PPOConfig(**common_trainer_args(cli, output_dir), steps_per_generation=1, num_ppo_epochs=1,
                       max_completion_length=cli.completion_length, temperature=0.7,
                       gradient_checkpointing=spec.gradient_checkpointing, **PPO)  # fmt: skip
    prompts = ppo_prompts(cli.batch * cli.steps, cli.prompt_length, shared.peft_model.config.vocab_size)
    timer = training_timer()
    trainer = PPOTrainer(shared, args=config, train_dataset=Dataset.from_dict({"prompt": prompts}),
                         processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    phases: dict[str, list] = {}
    time_method(trainer, "_generate", phases)  # sampling the completions
    time_method(trainer, "_generate_and_score_completions", phases)  # the whole rollout, sampling included
    stage("train")
    train_peak = train_with_step_peak(trainer)
    rollouts = phases["_generate_and_score_completions"]
    return {
        **loaded, **train_peak, "load_s": load_s, "steps": timed_steps(timer), **trained_settings(trainer, config),
        "generate_s": statistics.median(c["wall_s"] for c in phases["_generate"]),
        "rollout_s": statistics.median(c["wall_s"] for c in rollouts),
        "peak_rss_after_rollout_gib": rollouts[0]["peak_rss_gib"],
    }  # fmt: skip


def load_lora_model(spec: Configuration, cli, sequence_classification: bool):
    """The base in the configuration's dtype, as a causal LM (wrapped in a LoRA adapter) or a 1-label classifier."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_ext.models import SharedBaseArguments, lora_config

    peft_config = lora_config(SharedBaseArguments(lora_r=cli.lora_r, lora_alpha=2 * cli.lora_r, lora_dropout=0.0),
                              "llama")  # fmt: skip
    dtype = getattr(torch, spec.dtype)
    if sequence_classification:  # the reward trainer adds the adapter itself, from peft_config
        return AutoModelForSequenceClassification.from_pretrained(cli.base_dir, num_labels=1, dtype=dtype), peft_config
    return get_peft_model(AutoModelForCausalLM.from_pretrained(cli.base_dir, dtype=dtype), peft_config), None


def child_kway(spec: Configuration, cli, output_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from rlhf_ext.trainers import (
        PlackettLuceDPOConfig,
        PlackettLuceDPOTrainer,
        PlackettLuceRewardConfig,
        PlackettLuceRewardTrainer,
    )

    runtime = {"runtime_rss_gib": proc_status_gib("VmRSS")}
    stage("load base")
    clock = Clock()
    model, peft_config = load_lora_model(spec, cli, sequence_classification=spec.stage == "reward")
    tokenizer = AutoTokenizer.from_pretrained(cli.base_dir)
    load_s = clock.lap().wall_s
    loaded = {**runtime, "rss_after_load_gib": proc_status_gib("VmRSS")}
    stage("trainer init")
    lists = ranked_lists(cli.batch * cli.steps, cli.num_completions, cli.prompt_length, cli.completion_length,
                         model.config.vocab_size)  # fmt: skip
    common = dict(**common_trainer_args(cli, output_dir), gradient_checkpointing=spec.gradient_checkpointing,
                  max_length=cli.prompt_length + cli.completion_length + 8, learning_rate=1e-5,
                  shared_prompt=spec.shared_prompt)  # fmt: skip
    timer = training_timer()
    if spec.stage == "dpo":
        config = PlackettLuceDPOConfig(**common, beta=0.1)
        trainer = PlackettLuceDPOTrainer(model, args=config, train_dataset=Dataset.from_list(lists),
                                         processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    else:
        config = PlackettLuceRewardConfig(**common)
        trainer = PlackettLuceRewardTrainer(model, args=config, train_dataset=Dataset.from_list(lists),
                                            processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
    stage("train")
    train_peak = train_with_step_peak(trainer)
    return {**loaded, **train_peak, "load_s": load_s, "steps": timed_steps(timer), **trained_settings(trainer, config),
            "shared_prompt_active": trainer._shared_prompt.active}  # fmt: skip


def child_trl112(spec: Configuration, cli, output_dir: str) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from benchmarks.ppo_vs_trl import PPO

    runtime = {"runtime_rss_gib": proc_status_gib("VmRSS")}
    tokenizer = AutoTokenizer.from_pretrained(cli.base_dir, padding_side="left")
    prompts = ppo_prompts(cli.batch * cli.steps, cli.prompt_length, tokenizer.vocab_size)
    config = PPOConfig(**common_trainer_args(cli, output_dir), num_mini_batches=1, num_ppo_epochs=1,
                       total_episodes=cli.batch * cli.steps, response_length=cli.completion_length, temperature=0.7,
                       local_rollout_forward_batch_size=cli.batch, num_sample_generations=0,
                       gradient_checkpointing=spec.gradient_checkpointing, **PPO)  # fmt: skip
    clock = Clock()
    models = {}
    for role, model_class in (("policy", AutoModelForCausalLM), ("reference", AutoModelForCausalLM),
                              ("value", AutoModelForSequenceClassification),
                              ("reward", AutoModelForSequenceClassification)):  # fmt: skip
        stage(f"load {role} model")
        labels = {"num_labels": 1} if model_class is AutoModelForSequenceClassification else {}
        models[role] = model_class.from_pretrained(cli.base_dir, dtype=torch.float32, **labels)
    load_s = clock.lap().wall_s
    loaded = {**runtime, "rss_after_load_gib": proc_status_gib("VmRSS"), "trl_version": trl.__version__}
    stage("trainer init")
    timer = training_timer()
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=models["policy"], ref_model=models["reference"],
                         reward_model=models["reward"], value_model=models["value"],
                         train_dataset=Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]}),
                         callbacks=[timer])  # fmt: skip
    models.clear()  # the trainer holds them
    stage("train")
    train_peak = train_with_step_peak(trainer)
    return {**loaded, **train_peak, "load_s": load_s, "steps": timed_steps(timer), **trained_settings(trainer, config)}


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: MemoryError, torch's "can't allocate memory", or an ENOMEM OSError."""
    if isinstance(err, MemoryError):
        return True
    if isinstance(err, OSError) and err.errno == errno.ENOMEM:
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in OOM_MESSAGES)


# the last one: OpenMP could not map a thread's stack under the address-space limit
OOM_MESSAGES = ("can't allocate memory", "Cannot allocate memory", "not enough memory", "std::bad_alloc",
                "out of memory", "MemoryError", "Thread creation failed")  # fmt: skip


def silence_libraries() -> None:
    """Keep the children's output small: no progress bars, no per-step warnings."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    try:  # the trl 1.12 venv shadows the parent's trl; metadata may see both, the import sees the one in use
        import trl

        found["trl"] = trl.__version__
    except ImportError:
        pass
    return found


def child_main(cli) -> None:
    import torch

    torch.set_num_threads(cli.threads)
    torch.manual_seed(0)
    silence_libraries()
    stage("imports")
    spec = configurations(cli.dtype)[cli.child]
    run = child_trl112 if spec.name == "trl112_ppo" else child_ppo_shared if spec.stage == "ppo" else child_kway
    with tempfile.TemporaryDirectory() as output_dir:
        try:
            result = {**run(spec, cli, output_dir), "outcome": "ok"}
        except BaseException as err:
            if not is_out_of_memory(err):
                raise
            result = {"outcome": "oom", "error": f"{type(err).__name__}: {str(err)[:300]}", "oom_stage": _stage}
    result.update(peak_rss_gib=peak_rss_gib(), vm_peak_gib=proc_status_gib("VmPeak"), versions=versions())
    write_json(cli.result_file, result)


# -- parent: one process per configuration, then the table ---------------------------------------------------------


def address_space_limit(limit_gb: float):
    """A preexec_fn that caps the child's address space at `limit_gb` GiB (None: no cap)."""
    if not limit_gb:
        return None
    limit = int(limit_gb * 2**30)
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def child_args(name: str, cli, base_dir: Path, reward_dir: Path) -> list[str]:
    """The arguments of the child run of configuration `name`: this run's settings."""
    return ["--child", name, "--base_dir", str(base_dir), "--reward_dir", str(reward_dir),
            "--batch", str(cli.batch), "--prompt_length", str(cli.prompt_length),
            "--completion_length", str(cli.completion_length), "--num_completions", str(cli.num_completions),
            "--lora_r", str(cli.lora_r), "--steps", str(cli.steps), "--threads", str(cli.threads),
            "--dtype", cli.dtype, "--policy_lm_head", cli.policy_lm_head]  # fmt: skip


# glibc raises its mmap threshold (up to 32 MiB) after freeing large blocks, and then keeps later freed buffers of
# forward and backward in its heap: measured on the 1B K-way reward step, RSS rose by 1.1 GiB in the forward while
# autograd held 0.06 GiB, and malloc_trim gave it back. A fixed threshold returns every buffer above 64 KiB to the
# system when torch frees it, so peak RSS measures the memory the step holds, as max_memory_allocated does on a GPU.
GLIBC_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def failure_row(failure: ChildFailed) -> dict:
    """What a configuration's process left when it died without a result: out of memory or another error, the last
    stage it reached and the end of its output."""
    stages = [line[len("STAGE ") :] for line in failure.output.splitlines() if line.startswith("STAGE ")]
    tail = failure.output.strip().splitlines()[-25:]
    oom = any(message in failure.output for message in OOM_MESSAGES)
    return {"outcome": "oom" if oom else "error", "returncode": failure.returncode,
            "oom_stage" if oom else "failed_stage": stages[-1] if stages else None,
            "error": next((line for line in reversed(tail) if line.strip()), ""), "stderr_tail": tail}  # fmt: skip


def measure_configuration(spec: Configuration, python: str, cli, base_dir: Path, reward_dir: Path) -> dict:
    """Run one configuration in its own process; its result, or what went wrong (OOM, crash) as measured."""
    env = {"OMP_NUM_THREADS": str(cli.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}  # fmt: skip
    if not cli.glibc_default_malloc:
        env.update(GLIBC_MALLOC_ENV)
    clock = Clock()
    with tempfile.TemporaryDirectory() as folder:
        try:
            row = run_child("benchmarks.real_size", child_args(spec.name, cli, base_dir, reward_dir),
                            Path(folder) / "result.json", python=python, env=env,
                            preexec_fn=address_space_limit(cli.memory_limit_gb))  # fmt: skip
        except ChildFailed as failure:
            row = failure_row(failure)
    row["child_wall_s"] = clock.lap().wall_s
    return row


def memory_estimate(spec: Configuration, config, cli) -> tuple[dict | None, str | None]:
    """`rlhf_ext.memory.estimate` for this configuration in GiB per field, or (None, why not)."""
    if spec.stage is None:
        return None, "no estimate for TRL 1.12's four-model layout"
    try:
        from rlhf_ext.memory import estimate
    except ImportError as err:
        return None, f"rlhf_ext.memory not importable: {err}"
    kwargs = dict(stage=spec.stage, bits=spec.bits, lora_r=cli.lora_r, batch_size=cli.batch,
                  prompt_length=cli.prompt_length, completion_length=cli.completion_length,
                  num_completions=1 if spec.stage == "ppo" else cli.num_completions,
                  gradient_checkpointing=spec.gradient_checkpointing, device="cpu")  # fmt: skip
    if spec.stage in ("dpo", "reward") and "shared_prompt" in inspect.signature(estimate).parameters:
        kwargs["shared_prompt"] = spec.shared_prompt is not False
    if spec.stage == "ppo" and cli.policy_lm_head != "frozen":
        kwargs["policy_lm_head"] = cli.policy_lm_head
    if spec.bits == 4 and "compute_dtype" in inspect.signature(estimate).parameters:
        kwargs["compute_dtype"] = spec.dtype
    try:
        with warnings.catch_warnings():  # its meta-device model may emit deprecation notices; the table is the output
            warnings.simplefilter("ignore")
            est = estimate(config, **kwargs)
    except Exception as err:  # the module is young: a failing estimate must not cost the measurement
        return None, f"{type(err).__name__}: {err}"
    fields = ("total", "weights", "adapters_optimizer", "activations", "logits", "runtime")
    return {f: gib(getattr(est, f)) for f in fields if getattr(est, f, None) is not None}, None


def four_model_floor_gib(parameters: int) -> float:
    """What TRL 1.12's layout needs before any activation: four float32 models, and gradients + two AdamW moments
    for the two that train (policy and value)."""
    return gib(parameters * (4 * 4 + 2 * (4 + 2 * 4)))


def outcome_text(row: dict, cli) -> str:
    if row["outcome"] == "ok":
        return "ok"
    if row["outcome"] == "refused":
        return f"refused: {row['error']}"
    where = row.get("oom_stage") or row.get("failed_stage") or "?"
    error_type = row.get("error", "").split(":")[0] or f"exit {row.get('returncode')}"
    if row["outcome"] == "oom":
        floor = f"; needs >= {row['floor_gib']:.0f} GiB" if row.get("floor_gib") else ""
        return f"OOM at {cli.memory_limit_gb:g} GiB limit ({error_type}, {where}){floor}"
    return f"error ({error_type}, {where})"


def median_step(row: dict) -> Lap:
    """The median wall and CPU seconds of a row's timed steps (None each if it has none)."""
    steps = row.get("steps") or []
    return median_lap(Lap(**step) for step in steps) if steps else Lap(None, None)


def print_table(rows: list[dict], cli) -> None:
    def cell(value, width, fmt):
        return f"{value:>{width}{fmt}}" if isinstance(value, int | float) else f"{'-':>{width}}"

    header = (f"{'configuration':<26} {'bits':>4} {'ckpt':>4} {'peak RSS GiB':>12} {'train peak':>10} {'estimate':>8} "
              f"{'est/train':>9} "
              f"{'runtime':>7} {'load s':>7} {'step s':>8} {'cpu s':>8} {'rollout s':>9} {'gen s':>7}  outcome")
    print(header)
    print("-" * len(header))
    for row in rows:
        estimate = (row.get("estimate_gib") or {}).get("total")
        # the estimate is of the training step: compare it with the peak of training alone (loading excluded)
        measured = row.get("train_peak_rss_gib")
        ratio = estimate / measured if estimate and measured and row["outcome"] == "ok" else None
        print(f"{row['config']:<26} {row['bits']:>4} {'on' if row['gradient_checkpointing'] else 'off':>4} "
              f"{cell(row.get('peak_rss_gib'), 12, '.2f')} {cell(measured, 10, '.2f')} {cell(estimate, 8, '.2f')} "
              f"{cell(ratio, 8, '.2f')}{'x' if ratio else ' '} "
              f"{cell(row.get('runtime_rss_gib'), 7, '.2f')} {cell(row.get('load_s'), 7, '.1f')} "
              f"{cell(row.get('step_wall_s'), 8, '.2f')} {cell(row.get('step_cpu_s'), 8, '.2f')} "
              f"{cell(row.get('rollout_s'), 9, '.2f')} {cell(row.get('generate_s'), 7, '.2f')}  "
              f"{outcome_text(row, cli)}")  # fmt: skip


def trl112_python(cli) -> tuple[str | None, str | None]:
    """The trl 1.12 venv's python (created if missing), or (None, why it cannot be had)."""
    try:
        return str(trl_baseline_python(cli.venv)), None
    except (subprocess.CalledProcessError, RuntimeError, OSError) as err:
        return None, f"no trl 1.12.0 virtual environment at {cli.venv}: {err}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=DEFAULT_SIZE, choices=list(SHAPES), help="a shape of benchmarks/harness.py")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=CONFIG_NAMES, metavar="CONFIG",
                        help=f"configurations to run (default: all but the *_unshared twins): "
                             f"{', '.join(CONFIG_NAMES)}")  # fmt: skip
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per configuration, all timed (median)")
    parser.add_argument("--batch", type=int, default=2, help="prompts per PPO rollout; ranked lists per K-way step")
    parser.add_argument("--prompt_length", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--completion_length", type=int, default=32,
                        help="tokens per completion (PPO: max_completion_length)")
    parser.add_argument("--num_completions", type=int, default=4, help="K: completions per ranked list")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank (alpha = 2r, no dropout)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BITS),
                        help="compute dtype of the 4-bit base")
    parser.add_argument("--policy_lm_head", default="frozen", choices=["frozen", "trainable"],
                        help="PPO rows: the policy's LM head, the base's or a trainable copy (SharedBaseArguments)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each configuration's process")
    parser.add_argument("--glibc_default_malloc", action="store_true",
                        help="keep glibc's adaptive mmap threshold (peak RSS then includes freed buffers glibc keeps)")
    parser.add_argument("--memory_limit_gb", type=float, default=22.0,
                        help="address-space limit (RLIMIT_AS) of each configuration's process, GiB; 0: none")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "rlhf_ext-real-size",
                        help="cache of the saved bases and reward role folders (reused)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_TRL_VENV, help="the trl 1.12.0 virtual environment")
    parser.add_argument("--output", type=Path, help="JSON results (default: benchmarks/results/real_size-<size>.json)")
    parser.add_argument("--reestimate", type=Path, metavar="RESULTS_JSON",
                        help="print a saved run's table with the estimate recomputed (no measuring)")
    parser.add_argument("--child", choices=CONFIG_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--base_dir", help=argparse.SUPPRESS)
    parser.add_argument("--reward_dir", help=argparse.SUPPRESS)
    add_result_file_argument(parser)
    return parser.parse_args(argv)


def reestimate(results_file: Path) -> None:
    """Print the table of a saved run with the estimate computed again by today's `rlhf_ext.memory`: the
    measurements stay those of the run, so a change to the estimator is checked without measuring again."""
    saved = json.loads(results_file.read_text())
    cli = parse_args(saved["meta"]["command"][2:])
    config = llama_config(cli.size)
    specs = configurations(cli.dtype)
    rows = []
    for row in saved["results"]:
        estimate, why_not = memory_estimate(specs[row["config"]], config, cli)
        rows.append({**row, "estimate_gib": estimate, "estimate_unavailable": why_not})
    print(f"{results_file.name}: measured by {' '.join(saved['meta']['command'][1:])}; estimate of today's "
          "rlhf_ext.memory\n")
    print_table(rows, cli)


def main() -> None:
    cli = parse_args()
    if cli.reestimate:
        reestimate(cli.reestimate)
        return
    if cli.child:
        child_main(cli)
        return
    if cli.prepare:
        write_json(cli.result_file, prepare_cache(cli.prepare, Path(cli.base_dir), Path(cli.reward_dir), cli.lora_r))
        return

    started = Clock()
    base_dir, reward_dir = cache_paths(cli.work_dir, cli.size, cli.lora_r)
    if not (base_dir / DONE_MARK).exists():
        print(f"  writing the {cli.size} base to {base_dir} (once)", file=sys.stderr, flush=True)
    # in a process of its own, so the parent never holds a model's memory while the configurations run
    prepare_args = ["--prepare", cli.size, "--base_dir", str(base_dir), "--reward_dir", str(reward_dir), "--lora_r",
                    str(cli.lora_r)]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        parameters = run_child("benchmarks.real_size", prepare_args, Path(folder) / "prepare.json")["parameters"]
    config = llama_config(cli.size)
    specs = [spec for name, spec in configurations(cli.dtype).items() if name in cli.configs]
    rows = []
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.name} ...", file=sys.stderr, flush=True)
        python, refused = trl112_python(cli) if spec.name == "trl112_ppo" else (sys.executable, None)
        if refused:
            row = {"outcome": "refused", "error": refused}
        else:
            row = measure_configuration(spec, python, cli, base_dir, reward_dir)
        estimate, why_not = memory_estimate(spec, config, cli)
        step = median_step(row)
        row = {"config": spec.name, **{k: v for k, v in dataclasses.asdict(spec).items() if k != "name"},
               "size": cli.size, "parameters": parameters,
               "checkpoint_dtype": CHECKPOINT_DTYPE, "batch": cli.batch, "prompt_length": cli.prompt_length,
               "completion_length": cli.completion_length,
               "num_completions": 1 if spec.stage == "ppo" or spec.name == "trl112_ppo" else cli.num_completions,
               "lora_r": cli.lora_r, "threads": cli.threads, "memory_limit_gb": cli.memory_limit_gb,
               **row, "step_wall_s": step.wall_s, "step_cpu_s": step.cpu_s,
               "estimate_gib": estimate, "estimate_unavailable": why_not}  # fmt: skip
        if spec.name == "trl112_ppo":
            row["floor_gib"] = four_model_floor_gib(parameters)
        rows.append(row)
        print(f"[{i}/{len(specs)}] {spec.name}: {outcome_text(row, cli)}, peak RSS "
              f"{row.get('peak_rss_gib') or float('nan'):.2f} GiB, step {row['step_wall_s'] or float('nan'):.1f} s "
              f"({row['step_cpu_s'] or float('nan'):.1f} s CPU), {row.get('child_wall_s', 0):.0f} s in all",
              file=sys.stderr, flush=True)  # fmt: skip

    print(f"\n{cli.size} ({parameters / 1e9:.3f}B parameters, random weights, {CHECKPOINT_DTYPE} checkpoint): "
          f"batch {cli.batch}, prompt {cli.prompt_length} + completion {cli.completion_length} tokens, "
          f"K={cli.num_completions}, "
          f"LoRA r={cli.lora_r}, {cli.steps} timed step(s), {cli.threads} thread(s), limit {cli.memory_limit_gb:g} GiB "
          f"address space. step s / cpu s: wall / CPU seconds per optimizer step (PPO: one update, rollout "
          f"included); estimate: rlhf_ext.memory.estimate total, GiB; runtime: RSS after the imports, before any "
          f"model, GiB.\n")  # fmt: skip
    print_table(rows, cli)
    output = cli.output or RESULTS_DIR / f"real_size-{cli.size}.json"
    meta = {"command": [sys.executable, *sys.argv], "size": cli.size, "parameters": parameters,
            "model_config": {k: getattr(config, k) for k in SHAPES[cli.size]},
            "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                        "memory_gib": gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))},
            "malloc_env": {} if cli.glibc_default_malloc else GLIBC_MALLOC_ENV,
            "total_wall_s": started.lap().wall_s}  # fmt: skip
    write_json(output, {"meta": meta, "results": rows})
    print(f"\nresults: {output} ({meta['total_wall_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
