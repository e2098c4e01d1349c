"""GPU check on one H100/H200 (a few minutes, at most 8): peak GPU memory and time of one PPO update, one K-way DPO
step and one K-way reward step on a >= 1B base, in 4-bit (NF4, compute in bfloat16) and in bfloat16, with gradient
checkpointing on, each beside `rlhf_ext.memory.estimate(..., device="cuda")` ("-" where that module is missing).

The base has Llama-3.2-1B's shape (`--size`, a shape of benchmarks/harness.py), random weights built on the GPU
and saved once as bfloat16 safetensors under --work_dir (bitsandbytes quantizes at load time, from a folder). The
steps are written directly on `rlhf_ext.models.SharedBase` and `rlhf_ext.ops`, without TRL or datasets, which the GPU
machine does not have:

    ppo     rollout: `shared.peft_model.generate` samples `completion_length` tokens for `batch` prompts (EOS held
            off, so every completion is full length); no-grad policy (theta_old), reference (adapters off) and
            value forwards and the reward role's score; `token_rewards` (KL-penalised), `gae`, whitened advantages.
            update: policy and value forwards with grad, `ppo_loss`, one backward, one AdamW step (policy + value)
    dpo     `batch` lists of K completions: reference log-probs without grad, policy log-probs with grad,
            `dpo_plackett_luce_loss`, backward, AdamW on the policy adapter
    reward  the same sequences through the value adapter + scalar head (the layout of a LoRA reward model), the
            score at the last token, `plackett_luce_loss`, backward, AdamW on that adapter and head

Each kind of step runs `--steps` times (default 2: the first also allocates AdamW's state and CUDA's kernels; times
are the last step's); its peak is torch.cuda.max_memory_allocated() over them, after reset_peak_memory_stats() with
only the model resident. The three steps share one SharedBase per precision, so a K-way step holds 3 adapters where
a K-way trainer's model holds 1 (at 1B, 11.3M parameters each: <= 90 MB more), and each step's optimizer is freed
before the next.

What to bring to the GPU machine (it has torch, transformers, peft >= 0.17, accelerate, safetensors, numpy; it has
neither trl, datasets nor bitsandbytes, and this check needs only bitsandbytes, for the 4-bit rows):

    bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl     43.1 MB; its CUDA libraries include cuda130
                                                                (torch 2.11+cu130 there); needs torch, numpy, packaging

fetched here (PyPI) into a folder that git ignores (with the checkout, ~0.8 MB, well within a 64 MiB carry):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2

and installed there, offline (the second form where site-packages is not writable):

    pip install --no-deps --no-index .whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl
    pip install --no-deps --no-index --target /tmp/site .whl/bitsandbytes-0.50.2-*.whl && export PYTHONPATH=/tmp/site

`import rlhf_ext.models` and `import rlhf_ext.ops` import neither trl nor datasets (checked at start: the run stops
naming the module if they ever do). Without bitsandbytes the 4-bit rows say "skipped". The one command to run it,
from the repository root (expected 1-3 minutes on an H200, most of it writing and loading the 2.5 GB base; not yet
run on a GPU):

    python3 -m benchmarks.gpu_check --output gpu_check.json

and here, on the CPU, the same code at a tiny size in seconds (tests/test_benchmarks_gpu_check.py runs it):

    .venv/bin/python -m benchmarks.gpu_check --dry_run
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmarks.harness import RESULTS_DIR, SHAPES, Clock, peak_rss_gib, proc_status_gib, write_json
from benchmarks.real_size import EOS, PAD, llama_config

STEPS = ("ppo", "dpo", "reward")
MODES = ("4bit", "bf16")
DONE_MARK = "complete.json"
PPO = dict(kl_coef=0.05, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, temperature=0.7)
LEARNING_RATE = 1e-5
BETA = 0.1


def import_rlhf_ext():
    """Import the models and ops layers, and make sure that did not pull in trl or datasets."""
    before = set(sys.modules)
    import rlhf_ext.models
    import rlhf_ext.ops

    pulled = sorted({m.split(".")[0] for m in set(sys.modules) - before} & {"trl", "datasets"})
    if pulled:
        raise SystemExit(f"import rlhf_ext.models / rlhf_ext.ops imported {pulled}: the GPU machine has neither")
    return rlhf_ext.models, rlhf_ext.ops


# -- the model ---------------------------------------------------------------------------------------------------


def save_base(size: str, directory: Path, device) -> Path:
    """Random weights in `size`'s shape, built on `device`, saved once as bfloat16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    if (directory / DONE_MARK).exists():
        return directory
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(size), dtype=torch.bfloat16)
    model.save_pretrained(directory)
    (directory / DONE_MARK).write_text(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))
    del model
    free_memory(device)
    return directory


def build_shared(mode: str, base_dir: Path, lora_r: int, device):
    """The shared base in 4-bit (NF4, bfloat16 compute) or bfloat16, with a frozen reward role, checkpointing on."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head

    args = SharedBaseArguments(model_name_or_path=str(base_dir), lora_r=lora_r, lora_alpha=2 * lora_r,
                               lora_dropout=0.0, dtype="bfloat16", load_in_4bit=mode == "4bit")  # fmt: skip
    if mode == "4bit":  # bitsandbytes places the quantized layers at load time (on the GPU when there is one)
        shared = SharedBase.from_pretrained(str(base_dir), args)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, device_map={"": str(device)})
        shared = SharedBase(model, replace(args, model_name_or_path=str(base_dir)))
    with tempfile.TemporaryDirectory() as reward_dir:
        # the value adapter and head saved as a reward role stand in for the folder the reward trainer saves
        save_adapter_with_head(shared.peft_model, "value", shared.heads["value"], reward_dir, "reward")
        shared.load_role("reward", reward_dir)
    shared.enable_gradient_checkpointing(use_reentrant=False)
    return shared


# -- the three steps ---------------------------------------------------------------------------------------------


def completion_logprobs(shared, role: str, ids, mask, completion_length: int):
    """log pi(a_t | s_t) of the last `completion_length` tokens [N, C] under `role`, and their logits.

    Only the C + 1 last positions go through the LM head, as TRL's `logits_to_keep`."""
    from rlhf_ext.ops import selective_log_softmax

    with shared.role(role):
        out = shared.peft_model(input_ids=ids, attention_mask=mask, logits_to_keep=completion_length + 1,
                                use_cache=False)  # fmt: skip
    logits = out.logits[:, :-1]
    return selective_log_softmax(logits, ids[:, -completion_length:]), logits


def completion_values(shared, ids, mask, completion_length: int):
    """V(s_t) before each completion token [N, C]: positions P - 1 ... P + C - 2 of the value role's output."""
    return shared.values(ids, mask)[:, -completion_length - 1 : -1]


def ppo_update(shared, optimizer, inputs: dict, cli, clock) -> dict:
    """One PPO update: rollout (generation + scoring) and one optimizer step on it; phase seconds."""
    import torch

    from rlhf_ext.ops import entropy_from_logits, gae, masked_whiten, ppo_loss, token_rewards

    prompts, c = inputs["prompts"], cli.completion_length
    shared.eval()  # generation as TRL runs it: no checkpointing, KV cache on
    with torch.no_grad():
        ids = shared.peft_model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                         max_new_tokens=c, min_new_tokens=c, temperature=PPO["temperature"], top_k=0,
                                         top_p=1.0, pad_token_id=PAD, eos_token_id=EOS)  # fmt: skip
    times = {"generate_s": clock.lap().wall_s}
    shared.train()
    mask = torch.ones_like(ids)
    completion_mask = torch.ones_like(ids[:, -c:], dtype=torch.bool)  # EOS held off: every token is real
    with torch.no_grad():
        old_logprobs, _ = completion_logprobs(shared, "policy", ids, mask, c)
        ref_logprobs, _ = completion_logprobs(shared, "reference", ids, mask, c)
        old_values = completion_values(shared, ids, mask, c)
        scores = shared.reward_scores(ids, mask)
        rewards = token_rewards(scores, old_logprobs, ref_logprobs, completion_mask, kl_coef=PPO["kl_coef"])
        advantages, returns = gae(rewards.rewards, old_values, completion_mask, gamma=PPO["gamma"], lam=PPO["lam"])
        advantages = masked_whiten(advantages, completion_mask)
    times["score_s"] = clock.lap().wall_s
    logprobs, logits = completion_logprobs(shared, "policy", ids, mask, c)
    with torch.no_grad():  # logged by the trainer; ent_coef is 0
        entropy = entropy_from_logits(logits)
    values = completion_values(shared, ids, mask, c)
    loss = ppo_loss(logprobs, old_logprobs, advantages, completion_mask, values=values, old_values=old_values,
                    returns=returns, entropy=entropy, clip_range=PPO["cliprange"],
                    clip_range_value=PPO["cliprange_value"], vf_coef=PPO["vf_coef"]).loss  # fmt: skip
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times["update_s"] = clock.lap().wall_s
    return {**times, "loss": loss.item()}


def dpo_step(shared, optimizer, inputs: dict, cli, clock) -> dict:
    """One K-way DPO step: the policy against the reference (adapters off) on B lists of K completions."""
    import torch

    from rlhf_ext.ops import dpo_plackett_luce_loss

    ids, mask, c = inputs["ranked"], torch.ones_like(inputs["ranked"]), cli.completion_length
    shared.train()
    with torch.no_grad():
        ref_logps = completion_logprobs(shared, "reference", ids, mask, c)[0].sum(dim=1)
    policy_logps = completion_logprobs(shared, "policy", ids, mask, c)[0].sum(dim=1)
    lists = (cli.batch, cli.num_completions)
    loss = dpo_plackett_luce_loss(policy_logps.view(lists), ref_logps.view(lists), beta=BETA).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"update_s": clock.lap().wall_s, "loss": loss.item()}


def reward_step(shared, optimizer, inputs: dict, cli, clock) -> dict:
    """One K-way reward step: value adapter + head scores at the last token, Plackett-Luce loss over each list."""
    import torch

    from rlhf_ext.ops import plackett_luce_loss

    ids = inputs["ranked"]
    shared.train()
    scores = shared.values(ids, torch.ones_like(ids))[:, -1].view(cli.batch, cli.num_completions)
    loss = plackett_luce_loss(scores).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"update_s": clock.lap().wall_s, "loss": loss.item()}


STEP_FUNCTIONS = {"ppo": ppo_update, "dpo": dpo_step, "reward": reward_step}
TRAINED_ROLE = {"ppo": None, "dpo": "policy", "reward": "value"}  # None: policy and value


def random_inputs(cli, vocab_size: int, device) -> dict:
    """Prompt ids [B, P] for PPO; B lists of K prompt + completion sequences [B*K, P+C] for the K-way steps."""
    import torch

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab_size, (cli.batch, cli.prompt_length), generator=generator)
    completions = torch.randint(3, vocab_size, (cli.batch * cli.num_completions, cli.completion_length),
                                generator=generator)  # fmt: skip
    ranked = torch.cat([prompts.repeat_interleave(cli.num_completions, dim=0), completions], dim=1)
    return {"prompts": prompts.to(device), "ranked": ranked.to(device)}


# -- measuring ---------------------------------------------------------------------------------------------------


def device_clock(device) -> Clock:
    """A wall clock whose laps end after the device's queued work has finished."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return Clock(cpu=False, sync=sync)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated_gib(device) -> float:
    """Memory held now: allocated on the GPU; on a CPU the process's resident set."""
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    resident = proc_status_gib("VmRSS")
    return float("nan") if resident is None else resident


def peak_gib(device) -> float:
    """Peak GPU memory since the last reset; on a CPU the process's peak RSS (never reset)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()


def measure_step(step: str, shared, inputs: dict, cli, device) -> dict:
    """Run one kind of step `cli.steps` times with its own optimizer; peak memory over them, the last one's times."""
    import torch

    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    resident = allocated_gib(device)
    optimizer = torch.optim.AdamW(shared.trainable_parameters(TRAINED_ROLE[step]), lr=LEARNING_RATE)
    for _ in range(cli.steps):
        times = STEP_FUNCTIONS[step](shared, optimizer, inputs, cli, device_clock(device))
        times["step_s"] = sum(seconds for phase, seconds in times.items() if phase.endswith("_s"))  # its phases
    peak = peak_gib(device)
    del optimizer
    return {"resident_gib": resident, "peak_gib": peak, **times}


def memory_estimate(config, step: str, mode: str, cli, device) -> tuple[dict | None, str | None]:
    """`rlhf_ext.memory.estimate` in GiB per term for this step, or (None, why not)."""
    try:
        from rlhf_ext.memory import estimate
    except ImportError as err:
        return None, f"rlhf_ext.memory not importable: {err}"
    kwargs = dict(stage=step, bits=4 if mode == "4bit" else 16, lora_r=cli.lora_r, batch_size=cli.batch,
                  prompt_length=cli.prompt_length, completion_length=cli.completion_length,
                  num_completions=1 if step == "ppo" else cli.num_completions, gradient_checkpointing=True,
                  device=device.type)  # fmt: skip
    if "compute_dtype" in inspect.signature(estimate).parameters:
        kwargs["compute_dtype"] = "bfloat16"
    try:
        est = estimate(config, **kwargs)
    except Exception as err:  # a failing estimate must not cost the measurement
        return None, f"{type(err).__name__}: {err}"
    fields = ("total", "weights", "adapters_optimizer", "activations", "logits", "runtime")
    return {f: getattr(est, f) / 2**30 for f in fields if getattr(est, f, None) is not None}, None


def bitsandbytes_missing() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        return f"skipped: bitsandbytes not installed ({err})"
    return None


def run_mode(mode: str, base_dir: Path, config, cli, device) -> list[dict]:
    """The three steps on one shared base in `mode`; a row per step."""
    common = {"mode": mode, "size": cli.size, "device": str(device), "batch": cli.batch,
              "prompt_length": cli.prompt_length, "completion_length": cli.completion_length, "lora_r": cli.lora_r,
              "gradient_checkpointing": True, "bits": 4 if mode == "4bit" else 16, "compute_dtype": "bfloat16"}
    skipped = bitsandbytes_missing() if mode == "4bit" else None
    if skipped:
        return [{**common, "step": step, "outcome": skipped} for step in cli.steps_to_run]
    clock = device_clock(device)
    shared = build_shared(mode, base_dir, cli.lora_r, device)
    load_s = clock.lap().wall_s
    inputs = random_inputs(cli, config.vocab_size, device)
    rows = []
    for step in cli.steps_to_run:
        row = {**common, "step": step, "load_s": load_s,
               "num_completions": 1 if step == "ppo" else cli.num_completions}  # fmt: skip
        row.update(measure_step(step, shared, inputs, cli, device))
        row["estimate_gib"], row["estimate_unavailable"] = memory_estimate(config, step, mode, cli, device)
        row["outcome"] = "ok"
        rows.append(row)
        print(f"  {mode} {step}: peak {row['peak_gib']:.2f} GiB, {row['step_s']:.2f} s", file=sys.stderr, flush=True)
    del shared, inputs
    free_memory(device)
    return rows


def print_table(rows: list[dict], peak_label: str) -> None:
    def cell(value, width, fmt=".2f"):
        return f"{value:>{width}{fmt}}" if isinstance(value, int | float) else f"{'-':>{width}}"

    header = (f"{'mode':<5} {'step':<7} {peak_label:>13} {'estimate':>8} {'est/meas':>8} {'resident':>8} "
              f"{'step s':>7} {'gen s':>6} {'score s':>7} {'update s':>8}  outcome")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        estimate = (row.get("estimate_gib") or {}).get("total")
        peak = row.get("peak_gib")
        ratio = estimate / peak if estimate and peak else None
        print(f"{row['mode']:<5} {row['step']:<7} {cell(peak, 13)} {cell(estimate, 8)} {cell(ratio, 7)}"
              f"{'x' if ratio else ' '} {cell(row.get('resident_gib'), 8)} {cell(row.get('step_s'), 7)} "
              f"{cell(row.get('generate_s'), 6)} {cell(row.get('score_s'), 7)} {cell(row.get('update_s'), 8)}  "
              f"{row['outcome']}")  # fmt: skip


def quiet_libraries() -> None:
    """No progress bars or deprecation notices between the rows."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="llama-3.2-1b", choices=list(SHAPES))
    parser.add_argument("--dry_run", action="store_true",
                        help="--size tiny, and allowed without CUDA (on a CPU the peak is the process's RSS)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps_to_run", nargs="+", default=list(STEPS), choices=STEPS, metavar="STEP")
    parser.add_argument("--steps", type=int, default=2, help="repeats of each step (peak over them, last one's times)")
    parser.add_argument("--batch", type=int, default=2, help="prompts per PPO rollout; ranked lists per K-way step")
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--completion_length", type=int, default=32)
    parser.add_argument("--num_completions", type=int, default=4, help="K: completions per ranked list")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "rlhf_ext-gpu-check",
                        help="where the random base is saved (reused)")
    parser.add_argument("--output", type=Path, help="JSON results (default: benchmarks/results/gpu_check-<size>.json)")
    cli = parser.parse_args(argv)
    if cli.dry_run:
        cli.size = "tiny"
    return cli


def main(argv=None) -> list[dict]:
    cli = parse_args(argv)
    import torch

    import_rlhf_ext()
    quiet_libraries()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    if not torch.cuda.is_available() and not cli.dry_run:
        raise SystemExit("No CUDA device: this check is for a GPU; --dry_run runs it on the CPU at a tiny size.")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    started = Clock(cpu=False)
    base_dir = save_base(cli.size, cli.work_dir / f"{cli.size}-bfloat16", device)
    config = llama_config(cli.size)
    rows = [row for mode in cli.modes for row in run_mode(mode, base_dir, config, cli, device)]

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    parameters = json.loads((base_dir / DONE_MARK).read_text())["parameters"]
    print(f"\n{cli.size} ({parameters / 1e9:.3f}B parameters, random weights) on {gpu}: batch {cli.batch}, prompt "
          f"{cli.prompt_length} + completion {cli.completion_length} tokens, K={cli.num_completions}, LoRA "
          f"r={cli.lora_r}, gradient checkpointing on, bfloat16 compute. peak: max over {cli.steps} step(s); "
          f"resident: allocated before the step (weights + adapters); estimate: rlhf_ext.memory.estimate total, "
          f"GiB; times: the last step's, seconds.\n")  # fmt: skip
    print_table(rows, "peak GPU GiB" if device.type == "cuda" else "peak RSS GiB")
    output = cli.output or RESULTS_DIR / f"gpu_check-{cli.size}.json"
    meta = {"command": sys.argv, "device": gpu, "parameters": parameters, "total_s": started.lap().wall_s,
            "torch": torch.__version__, "cuda": torch.version.cuda}  # fmt: skip
    write_json(output, {"meta": meta, "results": rows})
    print(f"\nresults: {output} ({meta['total_s']:.0f} s in all)")
    return rows


if __name__ == "__main__":
    main()
