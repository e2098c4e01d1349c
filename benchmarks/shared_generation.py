"""Generation with each prompt prefilled once (`shared_prompt`) vs plain `generate`, side by side in one run.

What GRPOTrainer's transformers path generates for a batch: `--prompts` prompts, each given G = `--group` times in
consecutive left-padded rows, `--new_tokens` tokens sampled per row (temperature 1, no top-k / top-p, no EOS: every
row samples all of them). Two variants on the same rows, from the same seed:

    plain     `model.generate`: the prefill runs over all G x prompts rows
    shared    `rlhf_ext.models.shared_generation.generate_with_shared_prefill`: the prefill runs once per distinct
              prompt over its first P - 1 columns, the cache is copied to its G rows, generate runs from there

Model: SmolLM2-135M's shape from config (`benchmarks.harness.SHAPES["smollm2-135m"]`: hidden 576, 30 layers, 9
heads, 3 key-value heads, intermediate 1536, vocabulary 49152, tied embeddings; 134.5M parameters), random weights
and token ids, float32, sdpa attention, one CPU thread (`torch.set_num_threads(1)`). Prompt lengths per setting:
`--lengths` L gives the prompts L, 0.95 L, 0.9 L and 0.85 L tokens (cycled), so the rows carry left padding.
The default batch, 2 prompts x G = 4, keeps the run near 5 minutes on one core (a plain call at ~1024 tokens takes
about a minute there, most of it the prefill).

Reported per prompt length: the prefill positions each variant computes (rows x width; the shared one adds the G
rows' last column, which generate runs), the median over `--repeats` of the wall time and of this process's CPU time
(benchmarks/harness.py's clock; the CPU time stays steadier when other jobs share the machine), `x wall` / `x cpu`
(plain over shared), and whether the two sampled the same tokens. Each repeat times plain then shared, after one
short untimed call of each (16-token prompts, 2 new tokens).

    python -m benchmarks.shared_generation              # 2 prompts of ~256 and ~1024 tokens, G=4 (8 rows), 64 new
                                                        # tokens, medians of 3 (~5 min on an idle core)
    python -m benchmarks.shared_generation --prompts 4  # 16 rows: twice the time
    python -m benchmarks.shared_generation --quick      # 2 layers, lengths 64 and 256, 16 new tokens, 1 repeat

A JSON copy of the table goes to benchmarks/results/shared_generation[-quick].json.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from benchmarks.harness import RESULTS_DIR, Clock, median_lap, model_config, write_json
from rlhf_ext.models.shared_generation import generate_with_shared_prefill

SHAPE = "smollm2-135m"
PAD, BOS = 0, 1
LENGTH_FRACTIONS = (1.0, 0.95, 0.9, 0.85)  # of `--lengths`, cycled over the prompts: each its own left padding
VARIANTS = ("plain", "shared")


def build_model(layers: int | None) -> LlamaForCausalLM:
    """SmolLM2-135M's shape (or its first `layers` layers), random weights, float32, sdpa, in eval mode."""
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    config = model_config(SHAPE, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None, max_position_embeddings=8192)
    config.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def prompt_rows(length: int, prompts: int, group: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [prompts x group, width]: each prompt's `group` rows consecutive, left padded."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [max(1, round(length * LENGTH_FRACTIONS[i % len(LENGTH_FRACTIONS)])) for i in range(prompts)]
    width = max(lengths)
    ids, mask = [], []
    for n in lengths:
        tokens = torch.randint(3, vocab, (n,), generator=generator).tolist()
        ids += [[PAD] * (width - n) + tokens] * group
        mask += [[0] * (width - n) + [1] * n] * group
    return torch.tensor(ids), torch.tensor(mask)


def sampling_settings(new_tokens: int) -> dict:
    """TRL's generation settings at their defaults (sampling at temperature 1, no top-k / top-p), every row sampling
    `new_tokens` tokens (no EOS)."""
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, pad_token_id=PAD, eos_token_id=None)


def run_variant(model, variant: str, ids: torch.Tensor, mask: torch.Tensor, settings: dict) -> torch.Tensor:
    torch.manual_seed(0)  # the same draws for both variants
    with torch.no_grad():
        if variant == "plain":
            return model.generate(input_ids=ids, attention_mask=mask, **settings)
        return generate_with_shared_prefill(model, ids, mask, **settings)


def warm_up(model, settings: dict) -> None:
    """One short call of each variant, untimed: the first calls of each kernel and the allocator's pools."""
    ids, mask = prompt_rows(16, 2, 2, model.config.vocab_size, seed=1)
    for variant in VARIANTS:
        run_variant(model, variant, ids, mask, {**settings, "max_new_tokens": 2, "min_new_tokens": 2})


def measure(model, ids, mask, settings: dict, repeats: int) -> dict:
    """Median laps of each variant over `repeats` (plain then shared in each), and whether their tokens agree (the
    same seed each call, so every call of a variant samples the same tokens)."""
    laps, outputs = {variant: [] for variant in VARIANTS}, {}
    for _ in range(repeats):
        for variant in VARIANTS:
            clock = Clock()
            outputs[variant] = run_variant(model, variant, ids, mask, settings)
            laps[variant].append(clock.lap())
    medians = {variant: median_lap(laps[variant]) for variant in VARIANTS}
    return {
        **{f"{variant}_wall_s": medians[variant].wall_s for variant in VARIANTS},
        **{f"{variant}_cpu_s": medians[variant].cpu_s for variant in VARIANTS},
        "x_wall": medians["plain"].wall_s / medians["shared"].wall_s,
        "x_cpu": medians["plain"].cpu_s / medians["shared"].cpu_s,
        "same_tokens": bool(torch.equal(outputs["plain"], outputs["shared"])),
    }


def prefill_positions(mask: torch.Tensor, prompts: int) -> dict:
    """Positions each variant's prefill computes: plain, all rows x the width; shared, the distinct prompts x (width
    - 1) and then every row's last column."""
    rows, width = mask.shape
    return {"plain_positions": rows * width, "shared_positions": prompts * (width - 1) + rows}


def print_table(rows: list[dict]) -> None:
    header = (f"{'prompt':>7}{'width':>7}{'rows':>6}{'plain pos':>11}{'shared pos':>12}{'plain s':>9}{'shared s':>10}"
              f"{'x wall':>8}{'plain cpu':>11}{'shared cpu':>12}{'x cpu':>7}  same tokens")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['prompt_length']:>7}{row['width']:>7}{row['rows']:>6}{row['plain_positions']:>11}"
              f"{row['shared_positions']:>12}{row['plain_wall_s']:>9.2f}{row['shared_wall_s']:>10.2f}"
              f"{row['x_wall']:>7.2f}x{row['plain_cpu_s']:>11.2f}{row['shared_cpu_s']:>12.2f}{row['x_cpu']:>6.2f}x  "
              f"{'yes' if row['same_tokens'] else 'NO'}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, lengths 64 and 256, 16 new tokens, 1 repeat")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="longest prompt per setting")
    parser.add_argument("--prompts", type=int, default=2, help="distinct prompts per batch (G rows each)")
    parser.add_argument("--group", type=int, default=4, help="G: rows per prompt (num_generations)")
    parser.add_argument("--new_tokens", type=int, default=None, help="tokens sampled per row (default 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (median; default 3)")
    parser.add_argument("--output", type=Path, default=None, help="JSON results (default benchmarks/results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    layers = 2 if args.quick else None
    lengths = args.lengths or ([64, 256] if args.quick else [256, 1024])
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    model = build_model(layers)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{SHAPE} shape, {model.config.num_hidden_layers} layers: {parameters / 1e6:.1f}M parameters; "
          f"{args.prompts} prompts x G={args.group} rows, {new_tokens} new tokens sampled, median of {repeats}, "
          "1 thread, float32")
    settings = sampling_settings(new_tokens)
    warm_up(model, settings)
    rows = []
    for length in lengths:
        ids, mask = prompt_rows(length, args.prompts, args.group, model.config.vocab_size)
        row = {"prompt_length": length, "width": ids.size(1), "rows": ids.size(0),
               **prefill_positions(mask, args.prompts), **measure(model, ids, mask, settings, repeats)}
        rows.append(row)
        print(f"  prompts of ~{length}: plain {row['plain_wall_s']:.2f}s, shared {row['shared_wall_s']:.2f}s",
              flush=True)
    print()
    print_table(rows)
    output = args.output or RESULTS_DIR / f"shared_generation{'-quick' if args.quick else ''}.json"
    write_json(output, {
        "command": " ".join(["python -m benchmarks.shared_generation", *(sys.argv[1:] if argv is None else argv)]),
        "shape": SHAPE, "layers": model.config.num_hidden_layers, "parameters": parameters,
        "prompts": args.prompts, "group": args.group, "new_tokens": new_tokens, "repeats": repeats,
        "threads": 1, "dtype": "float32", "torch": torch.__version__, "machine": platform.processor() or
        platform.machine(), "rows": rows,
    })
    print(f"\nwrote {output}")
    return rows


if __name__ == "__main__":
    main()
