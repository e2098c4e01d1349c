"""Each prompt computed once, in PPO: one update with num_generations=4 at SmolLM2-135M's shape, per phase, with
`shared_prompt=False` (unshared) and the default `shared_prompt=None` (shared where exact), side by side in one run.

The trainer is `rlhf_ext.trainers.PPOTrainer` on a `SharedBase` built as benchmarks/real_size.py builds it: the base
of the shape `--size` (benchmarks/harness.py; default smollm2-135m, 134.5M parameters) from config with random
weights (no download), saved as bfloat16 with a word-level tokenizer of its vocabulary size and loaded in float32;
policy and value LoRA adapters r=16; a frozen reward adapter + head loaded from a role folder; reference = adapters
off. PPOConfig: num_generations=4, per_device_train_batch_size=8, steps_per_generation=2 (a generation batch is 4
prompts x 4 completions = 2 micro-batches, one optimizer step each), num_ppo_epochs=1, max_completion_length 32,
temperature 1, the hyperparameters of benchmarks/ppo_vs_trl.py, fp32 (use_cpu, bf16=False), activation checkpointing
on (TRL's default; `--no_checkpointing` turns it off), seed 0, one CPU thread. Prompts are `--prompt_tokens` random
words (one token each) of the vocabulary; the random model seldom samples EOS, so completions run to the limit.

Each variant is one trainer (built from the same seed, the dataset in order, not shuffled) trained for
1 + repeats x len(prompt_tokens) generation batches: one untimed warm-up update (at the shortest prompt length),
then `--repeats` updates at each prompt length, shortest first. The trainer's methods are wrapped on the instance to
time them; per generation batch, in this process's CPU seconds (benchmarks/harness.py's clock):

    generation        GRPOTrainer._generate: sampling the completions
    scoring           _calculate_rewards: the reward role's forward
    rollout forwards  the rest of the rollout (`_prepare_inputs` minus the two above): theta_old, reference and
                      critic forwards, GAE, shuffling the batch into micro-batches
    update            each optimizer step (on_step_begin to on_step_end: policy + value loss forward and backward,
                      clipping, optimizer, scheduler) minus what its `_prepare_inputs` spent on the rollout
    total             the sum: the optimizer steps of the generation batch, end to end

The table gives the median of each over the `--repeats` generation batches of a prompt length, unshared and shared,
and the ratio unshared / shared (wall seconds are in the JSON). Sharing must not change the run: both variants must
sample the same completion ids in the first rollout (checked; a mismatch is an error), and the largest difference
of the micro-batches' losses is printed. The JSON goes to benchmarks/results/ppo_shared_prompt[-quick].json.

    python -m benchmarks.ppo_shared_prompt                 # prompts of 64 and 256 tokens, medians of 3 (24 CPU min)
    python -m benchmarks.ppo_shared_prompt --prompt_tokens 256 --repeats 5
    python -m benchmarks.ppo_shared_prompt --quick         # 2 layers, 16-token prompts, 8-token completions
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from benchmarks.harness import RESULTS_DIR, SHAPES, Clock, Lap, write_json
from benchmarks.real_size import llama_config, ppo_prompts, silence_libraries, word_tokenizer

VARIANTS = {"unshared": False, "shared": None}  # PPOConfig.shared_prompt
PHASES = ("generation", "scoring", "rollout forwards", "update")
NUM_GENERATIONS, BATCH, STEPS_PER_GENERATION = 4, 8, 2
PROMPTS_PER_GENERATION = BATCH * STEPS_PER_GENERATION // NUM_GENERATIONS


# -- the base and the reward role on disk --------------------------------------------------------------------------


def prepare(folder: Path, size: str, layers: int | None, lora_r: int) -> tuple[Path, Path, int]:
    """Save the random base of `size` (with `layers` decoder layers if given) in bfloat16 with its word tokenizer,
    and a reward role folder on it; (base dir, reward dir, parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head

    base_dir, reward_dir = folder / "base", folder / "reward_role"
    torch.manual_seed(0)
    config = llama_config(size)
    if layers is not None:
        config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base_dir)
    word_tokenizer(config.vocab_size).save_pretrained(base_dir)
    del model
    args = SharedBaseArguments(lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, dtype="bfloat16")
    donor = SharedBase.from_pretrained(str(base_dir), args)
    save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], reward_dir, "reward")
    return base_dir, reward_dir, parameters


def prompt_schedule(prompt_tokens: list[int], repeats: int, vocab_size: int) -> tuple[list[str], list[int]]:
    """The prompts in training order and the length of each generation batch: a warm-up batch at the shortest length,
    then `repeats` batches per length, shortest first; every prompt distinct."""
    lengths = sorted(prompt_tokens)
    batches = [lengths[0]] + [n for n in lengths for _ in range(repeats)]
    prompts = []
    for i, n in enumerate(batches):
        drawn = ppo_prompts(PROMPTS_PER_GENERATION * (i + 1), n, vocab_size)  # seed 0: draw more, keep the new ones
        prompts += drawn[-PROMPTS_PER_GENERATION:]
    return prompts, batches


# -- one variant -----------------------------------------------------------------------------------------------------


def build_trainer(shared_prompt: bool | None, cli, base_dir: Path, reward_dir: Path, prompts: list[str],
                  output_dir: str, timer):  # fmt: skip
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback

    from benchmarks.ppo_vs_trl import PPO
    from rlhf_ext.models import SharedBase, SharedBaseArguments
    from rlhf_ext.trainers.ppo.config import PPOConfig
    from rlhf_ext.trainers.ppo.trainer import PPOTrainer

    torch.manual_seed(0)
    args = SharedBaseArguments(lora_r=cli.lora_r, lora_alpha=2 * cli.lora_r, lora_dropout=0.0, dtype="float32",
                               reward_adapter_path=str(reward_dir))  # fmt: skip
    shared = SharedBase.from_pretrained(str(base_dir), args)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), padding_side="left")
    generation_batches = len(prompts) // PROMPTS_PER_GENERATION
    config = PPOConfig(
        output_dir=output_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        steps_per_generation=STEPS_PER_GENERATION, num_generations=NUM_GENERATIONS, num_ppo_epochs=1,
        max_steps=generation_batches * STEPS_PER_GENERATION, max_completion_length=cli.completion_tokens,
        temperature=1.0, shuffle_dataset=False, gradient_checkpointing=not cli.no_checkpointing,
        shared_prompt=shared_prompt, report_to=[], bf16=False, use_cpu=True, save_strategy="no",
        logging_steps=10**6, disable_tqdm=True, seed=0, **PPO,
    )  # fmt: skip
    trainer = PPOTrainer(shared, args=config, train_dataset=Dataset.from_dict({"prompt": prompts}),
                         processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the end-of-training metrics: the table is the output
    return trainer


def step_timer():
    """A TrainerCallback with the `Clock` lap of every optimizer step, from on_step_begin to on_step_end."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.laps: list[Lap] = []
            self.clock: Clock | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.clock = Clock()

        def on_step_end(self, args, state, control, **kwargs):
            self.laps.append(self.clock.lap())

    return StepTimer()


def timed(trainer, name: str, laps: list, outputs: list | None = None) -> None:
    """Wrap the instance's `name` so each call appends its `Clock` lap to `laps` (and what it returned to
    `outputs`)."""
    method = getattr(trainer, name)

    def wrapper(*args, **kwargs):
        clock = Clock()
        out = method(*args, **kwargs)
        laps.append(clock.lap())
        if outputs is not None:
            outputs.append(out)
        return out

    setattr(trainer, name, wrapper)


def minus(a: Lap, *others: Lap) -> Lap:
    return Lap(a.wall_s - sum(o.wall_s for o in others), a.cpu_s - sum(o.cpu_s for o in others))


def plus(*laps: Lap) -> Lap:
    return Lap(sum(lap.wall_s for lap in laps), sum(lap.cpu_s for lap in laps))


def run_variant(name: str, cli, base_dir: Path, reward_dir: Path, prompts: list[str]) -> dict:
    """Train one variant over the whole schedule; its phases per generation batch, completion ids and losses."""
    print(f"  {name}: building and training ({len(prompts) // PROMPTS_PER_GENERATION} generation batches)",
          file=sys.stderr, flush=True)  # fmt: skip
    timer = step_timer()
    laps: dict[str, list[Lap]] = {"_generate": [], "_calculate_rewards": [], "_prepare_inputs": [],
                                  "training_step": []}  # fmt: skip
    generated, losses = [], []
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(VARIANTS[name], cli, base_dir, reward_dir, prompts, output_dir, timer)
        timed(trainer, "_generate", laps["_generate"], generated)
        timed(trainer, "_calculate_rewards", laps["_calculate_rewards"])
        timed(trainer, "_prepare_inputs", laps["_prepare_inputs"])
        timed(trainer, "training_step", laps["training_step"], losses)
        trainer.train()
        shared_active = bool(trainer._shared_prompt.active)
    steps, prepared = timer.laps, laps["_prepare_inputs"]
    batches = []
    for g, (gen, score) in enumerate(zip(laps["_generate"], laps["_calculate_rewards"], strict=True)):
        span = slice(g * STEPS_PER_GENERATION, (g + 1) * STEPS_PER_GENERATION)
        total, rollout = plus(*steps[span]), plus(*prepared[span])
        phases = {"generation": gen, "scoring": score, "rollout forwards": minus(rollout, gen, score),
                  "update": minus(total, rollout), "total": total}  # fmt: skip
        batches.append({phase: lap._asdict() for phase, lap in phases.items()})
    return {"variant": name, "shared_prompt": VARIANTS[name], "shared_prompt_active": shared_active,
            "batches": batches, "completion_ids": [out[1] for out in generated],
            "losses": [float(loss) for loss in losses]}  # fmt: skip


# -- the comparison ------------------------------------------------------------------------------------------------


def medians(run: dict, indices: list[int]) -> dict[str, dict[str, float]]:
    """Per phase, the median wall and CPU seconds over the generation batches `indices`."""
    return {phase: {clock: statistics.median(run["batches"][i][phase][clock] for i in indices)
                    for clock in ("wall_s", "cpu_s")} for phase in (*PHASES, "total")}  # fmt: skip


def print_table(row: dict) -> None:
    print(f"\nprompt {row['prompt_tokens']} tokens + completion {row['completion_tokens']}, "
          f"{NUM_GENERATIONS} completions per prompt, {PROMPTS_PER_GENERATION} prompts per generation batch; "
          f"CPU s per generation batch, median of {row['repeats']}")  # fmt: skip
    header = f"{'phase':<18}{'unshared s':>12}{'shared s':>10}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for phase in (*PHASES, "total"):
        unshared, shared = row["unshared"][phase]["cpu_s"], row["shared"][phase]["cpu_s"]
        print(f"{phase:<18}{unshared:>12.2f}{shared:>10.2f}{unshared / shared:>7.2f}x")


def git_head() -> str | None:
    result = subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    return result.stdout.strip()[:120] or None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 layers, 16-token prompts, 8-token completions, 1 repeat")  # fmt: skip
    parser.add_argument("--size", default="smollm2-135m", choices=list(SHAPES), help="a shape of benchmarks/harness")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--prompt_tokens", type=int, nargs="+", default=None, help="prompt lengths (default 64 256)")
    parser.add_argument("--completion_tokens", type=int, default=None, help="max_completion_length (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed generation batches per length (default 3)")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank of policy, value and reward adapters")
    parser.add_argument("--no_checkpointing", action="store_true", help="activation checkpointing off")
    parser.add_argument("--output", type=Path, default=None, help="JSON results (default benchmarks/results/)")
    cli = parser.parse_args(argv)
    quick = {"layers": 2, "prompt_tokens": [16], "completion_tokens": 8, "repeats": 1}
    full = {"layers": None, "prompt_tokens": [64, 256], "completion_tokens": 32, "repeats": 3}
    for key, value in (quick if cli.quick else full).items():
        if getattr(cli, key) is None:
            setattr(cli, key, value)

    import torch

    torch.set_num_threads(1)
    silence_libraries()
    warnings.filterwarnings("ignore")
    started = Clock()
    with tempfile.TemporaryDirectory() as folder:
        base_dir, reward_dir, parameters = prepare(Path(folder), cli.size, cli.layers, cli.lora_r)
        vocab_size = llama_config(cli.size).vocab_size
        prompts, batch_lengths = prompt_schedule(cli.prompt_tokens, cli.repeats, vocab_size)
        layers = cli.layers or SHAPES[cli.size]["num_hidden_layers"]
        print(f"{cli.size}, {layers} layers ({parameters / 1e6:.1f}M parameters), float32, 1 thread, activation "
              f"checkpointing {'off' if cli.no_checkpointing else 'on'}; generation batches of prompt lengths "
              f"{batch_lengths} (the first untimed)", file=sys.stderr, flush=True)  # fmt: skip
        runs = {name: run_variant(name, cli, base_dir, reward_dir, prompts) for name in VARIANTS}

    unshared, shared = runs["unshared"], runs["shared"]
    if unshared["completion_ids"][0] != shared["completion_ids"][0]:
        raise AssertionError("sharing changed the run: the first rollout's completion ids differ between variants")
    same_rollouts = sum(a == b for a, b in zip(unshared["completion_ids"], shared["completion_ids"], strict=True))
    loss_diff = max(abs(a - b) for a, b in zip(unshared["losses"], shared["losses"], strict=True))
    rows = []
    for n in sorted(set(cli.prompt_tokens)):
        indices = [i for i, length in enumerate(batch_lengths) if i > 0 and length == n]
        row = {"prompt_tokens": n, "completion_tokens": cli.completion_tokens, "repeats": len(indices),
               "unshared": medians(unshared, indices), "shared": medians(shared, indices)}  # fmt: skip
        row["ratio_cpu"] = {phase: row["unshared"][phase]["cpu_s"] / row["shared"][phase]["cpu_s"]
                            for phase in (*PHASES, "total")}  # fmt: skip
        rows.append(row)
        print_table(row)
    print(f"\nsame completion ids: the first rollout (checked) and {same_rollouts} of {len(batch_lengths)} rollouts; "
          f"largest |loss unshared - loss shared| over the {len(unshared['losses'])} micro-batches: {loss_diff:.3g}; "
          f"shared_prompt active in the shared run: {shared['shared_prompt_active']}")  # fmt: skip
    output = cli.output or RESULTS_DIR / f"ppo_shared_prompt{'-quick' if cli.quick else ''}.json"
    for run in runs.values():
        run.pop("completion_ids")
    meta = {"command": [sys.executable, "-m", "benchmarks.ppo_shared_prompt", *(argv or sys.argv[1:])],
            "size": cli.size, "layers": layers, "parameters": parameters, "lora_r": cli.lora_r,
            "num_generations": NUM_GENERATIONS, "per_device_train_batch_size": BATCH,
            "steps_per_generation": STEPS_PER_GENERATION, "checkpointing": not cli.no_checkpointing,
            "batch_prompt_tokens": batch_lengths, "threads": 1, "git_head": git_head(),
            "machine": platform.processor() or platform.machine(), "total_wall_s": started.lap().wall_s}  # fmt: skip
    result = {"meta": meta, "same_first_rollout": True, "same_rollouts": same_rollouts,
              "max_abs_loss_diff": loss_diff, "rows": rows, "runs": runs}  # fmt: skip
    write_json(output, result)
    print(f"\nwrote {output} ({meta['total_wall_s']:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
