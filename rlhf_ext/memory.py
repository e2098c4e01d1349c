"""Predicted peak memory of a PPO update, a K-way DPO step and a K-way reward step, before renting a GPU.

The peak of one training step is the sum of four terms (docs/shared-base.md, "Memory"):

    weights             the base once: quantized linear layers at 4 or 8 bits (+ their quantization constants),
                        embeddings / LM head in the compute dtype, norms in float32 on a quantized base;
                        plus every LoRA adapter the stage holds (PPO: policy, value, frozen reward; no value
                        adapter with value_layout="policy_trunk")
    adapters_optimizer  trainable adapters and heads: parameter + gradient + AdamW's two moments
                        (in the parameter's dtype; one byte each with bitsandbytes' 8-bit AdamW); with
                        policy_lm_head="trainable" (PPO, DPO) also the policy's copy of the LM head, vocab x
                        hidden in the compute dtype with its gradient and moments (16 bytes a weight in float32);
                        with value_lora_embeddings (PPO) also the value's LoRA on the embeddings, r x (vocab + hidden)
    activations         what autograd keeps for backward. Counted, not guessed: one decoder layer of the real
                        architecture, with its LoRA adapters, runs forward on PyTorch's meta device (shapes, no
                        data, no memory) and every tensor it saves for backward is summed. Without
                        checkpointing every layer keeps that much; with it each layer keeps its input and one
                        layer's worth is rebuilt at a time during backward
    logits              TRL's fused LM head: a few float32 [min(N, 4096), min(V, 32768)] tiles (2 with its
                        Triton kernel on a GPU, 7 with its torch fallback on a CPU), never the [B, T, V] logits
    runtime             device="cpu" only: the Python process with torch, transformers, peft and TRL loaded
                        (its resident set before any model; on a GPU, torch.cuda.max_memory_allocated
                        does not count the CUDA context)

Sequences per trainable forward: PPO B x (P + C) twice (policy and value forwards are both alive at
its one backward; once with value_layout="policy_trunk", whose value head reads the policy forward's
last hidden state); K-way DPO and reward B x K x (P + C). Rollout work (generation with its KV cache,
reference / reward / old-policy forwards without grad) is transient and smaller than the training
step at these batch sizes, so it is not a term.

    from rlhf_ext.memory import estimate
    estimate("HuggingFaceTB/SmolLM2-1.7B", stage="ppo", bits=4, batch_size=8, prompt_length=512,
             completion_length=256).total / 2**30            # GiB

    python -m rlhf_ext.memory --model HuggingFaceTB/SmolLM2-1.7B --stage ppo --bits 4   # a table
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
from dataclasses import dataclass, fields

import torch

STAGES = ("ppo", "dpo", "reward")
GIB = 2**30
# TRL's fused LM head projects [tokens, vocabulary] tiles of at most this size (trl/kernels/chunked_logprob.py)
FUSED_HEAD_TOKENS, FUSED_HEAD_VOCAB = 4096, 32768
# Tile-sized float32 buffers TRL's fused head holds at once in backward: the Triton kernel (GPU) keeps the tile
# and its gradient; the torch fallback (CPU) materialises each elementwise step (logits in float32, log-softmax,
# softmax, gradient ...): 7 measured, from the 135M K-way DPO step's backward peak (0.77 GiB over 0.104 GiB tiles).
FUSED_HEAD_TILE_BUFFERS = {"cuda": 2, "cpu": 7}
# Resident set of a process that imported torch, transformers, peft, accelerate and TRL
# and training a model of 0.3 MB (measured: `python -m benchmarks.real_size --size tiny` peaks at 0.55 GiB)
CPU_RUNTIME_BYTES = int(0.55 * GIB)
ADAMW_MOMENTS = 2


# Published architectures, so the estimate runs offline by name (from each model's config.json on the Hub)
KNOWN_SHAPES = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, intermediate_size=8192, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "qwen2.5-14b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False),
    "llama-3.1-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False),
}


@dataclass
class MemoryEstimate:
    """Predicted peak bytes of one training step, by term; `total` is their sum."""

    stage: str
    weights: int
    adapters_optimizer: int
    activations: int
    logits: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters_optimizer + self.activations + self.logits + self.runtime

    def gib(self) -> dict[str, float]:
        """Every term and the total in GiB, rounded to 0.01."""
        terms = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stage"}
        return {name: round(value / GIB, 2) for name, value in {**terms, "total": self.total}.items()}


def load_config(config_or_name):
    """A transformers config from a config object, a dict of config fields (`model_type` default "llama"), a name of
    `KNOWN_SHAPES`, or a Hub id / local folder with a config.json."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_name, PretrainedConfig):
        return config_or_name
    if isinstance(config_or_name, str) and config_or_name.lower() in KNOWN_SHAPES:
        config_or_name = KNOWN_SHAPES[config_or_name.lower()]
    elif isinstance(config_or_name, str) and near_miss(config_or_name):
        # a typo of a known shape would otherwise be looked up on the Hub: a long wait, then a 50-line OSError
        raise ValueError(unknown_shape(config_or_name))
    if isinstance(config_or_name, dict):
        fields_ = dict(config_or_name)
        return AutoConfig.for_model(fields_.pop("model_type", "llama"), **fields_)
    return AutoConfig.from_pretrained(config_or_name)


def _meta_model(config, num_layers: int, dtype: torch.dtype, stage: str):
    """The model of `config` with `num_layers` decoder layers on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    overrides = {"num_hidden_layers": num_layers}
    if getattr(config, "layer_types", None):  # per-layer attention kinds (e.g. Qwen2's sliding window): keep the first
        overrides["layer_types"] = list(config.layer_types)[:num_layers]
    if stage == "reward":
        overrides.update(num_labels=1, id2label={0: "LABEL_0"}, label2id={"LABEL_0": 0})
    config = config.__class__(**{**config.to_dict(), **overrides})
    auto = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype)


def _with_lora(model, lora_r: int, target_modules):
    from dataclasses import replace

    from peft import get_peft_model

    from .models import SharedBaseArguments, lora_config

    args = SharedBaseArguments(lora_r=lora_r, lora_dropout=0.0, lora_target_modules=target_modules)
    config = lora_config(args, model.config.model_type)
    if not hasattr(model, "lm_head"):  # the reward model: a sequence classifier, as the K-way reward trainer trains
        config = replace(config, task_type="SEQ_CLS")
    return get_peft_model(model, config)


@dataclass(frozen=True)
class Counts:
    """Parameter counts of a model: linear layers inside the decoder (what bitsandbytes quantizes), their output
    rows, everything else (embeddings, LM head, norms), one LoRA adapter, and a norm's share of the rest."""

    linear: int
    linear_rows: int
    other: int
    norms: int
    lora: int


def _count(config, stage: str, lora_r: int, target_modules) -> Counts:
    model = _meta_model(config, config.num_hidden_layers, torch.float32, stage)
    linear = [m for m in model.base_model.layers.modules() if isinstance(m, torch.nn.Linear)]
    linear_params = sum(m.weight.numel() for m in linear)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied embeddings count once
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    peft = _with_lora(model, lora_r, target_modules)
    lora = sum(p.numel() for n, p in peft.named_parameters() if ".lora_" in n)
    return Counts(linear_params, sum(m.weight.shape[0] for m in linear), total - linear_params, norms, lora)


_COUNTS: dict[tuple, Counts] = {}


def parameter_counts(config, stage: str = "ppo", lora_r: int = 16, target_modules=None) -> Counts:
    """Counts of `config` (any transformers config) for `stage`, computed on the meta device (cached)."""
    config = load_config(config)
    key = (config.to_json_string(), stage, lora_r, tuple(target_modules or ()))
    if key not in _COUNTS:
        _COUNTS[key] = _count(config, stage, lora_r, list(target_modules) if target_modules else None)
    return _COUNTS[key]


def saved_bytes_per_token_per_layer(config, dtype: torch.dtype, lora_r: int = 16, sequence_length: int = 128,
                                    target_modules=None) -> float:
    """Bytes autograd saves for backward in one decoder layer with LoRA on a frozen base, per token.

    One real-size layer runs forward on the meta device under `saved_tensors_hooks`; parameters (saved for the
    input gradient) are not activations and are skipped, and a tensor saved by several ops counts once. On the meta
    device attention takes PyTorch's math path, which saves the [B, heads, T, T] scores and probabilities; the
    flash / memory-efficient kernels that GPUs and CPUs run keep only a [B, heads, T] log-sum-exp instead, so the
    T x T tensors are left out and the log-sum-exp counted.
    """
    config = load_config(config)
    model = _with_lora(_meta_model(config, 1, dtype, "ppo"), lora_r, target_modules).train()
    base = model.get_base_model()
    parameters = {id(p) for p in base.parameters()}
    heads = config.num_attention_heads
    saved: dict[int, int] = {}
    keep = []

    def pack(tensor):
        root = tensor._base if tensor._base is not None else tensor
        is_attention_scores = tuple(root.shape[-2:]) == (sequence_length, sequence_length) and root.dim() >= 3
        if id(root) not in parameters and not is_attention_scores:
            saved[id(root)] = root.numel() * root.element_size()
            keep.append(root)  # ids stay unique while the tensors are alive
        return tensor

    hidden = torch.randn(1, sequence_length, config.hidden_size, device="meta", dtype=dtype, requires_grad=True)
    positions = torch.arange(sequence_length, device="meta")[None]
    position_embeddings = base.model.rotary_emb(hidden, positions)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        base.model.layers[0](hidden, position_embeddings=position_embeddings, attention_mask=None,
                             position_ids=positions)
    log_sum_exp = heads * sequence_length * 4
    return (sum(saved.values()) + log_sum_exp) / sequence_length


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _weights_bytes(counts: Counts, bits: int, compute: torch.dtype, adapters: int, adapter: torch.dtype) -> int:
    if bits == 4:
        # NF4: half a byte a weight; one absmax per 64 weights, itself 8-bit with double quantization
        quantized = counts.linear // 2 + counts.linear // 64
        rest = (counts.other - counts.norms) * _dtype_bytes(compute) + counts.norms * 4
    elif bits == 8:
        quantized = counts.linear + 4 * counts.linear_rows  # int8 weights and one float32 scale per row
        rest = (counts.other - counts.norms) * _dtype_bytes(compute) + counts.norms * 4
    else:
        quantized, rest = counts.linear * _dtype_bytes(compute), counts.other * _dtype_bytes(compute)
    return quantized + rest + adapters * counts.lora * _dtype_bytes(adapter)


def estimate(config, stage: str = "ppo", bits: int = 16, lora_r: int = 16, batch_size: int = 2,
             prompt_length: int = 64, completion_length: int = 32, num_completions: int = 4,
             gradient_checkpointing: bool = True, device: str = "cuda", optimizer: str = "adamw_torch",
             compute_dtype: str | None = None, target_modules=None,
             value_layout: str = "own_adapter", policy_lm_head: str = "frozen",
             value_lora_embeddings: bool = False, shared_prompt: bool = True) -> MemoryEstimate:
    """Predicted peak memory of one training step of `stage` ("ppo", "dpo" or "reward") on a base of `config`.

    bits: 32 (float32 base), 16 (bfloat16 base), 8 or 4 (bitsandbytes, computing in `compute_dtype`, by
    default bfloat16 on a GPU and float32 on a CPU). LoRA of rank `lora_r` on every projection (the presets);
    adapters train in float32, or in bfloat16 on a quantized bfloat16 base (QLoRA, as `SharedBase` and TRL do).
    optimizer: TRL's `optim` name; "adamw_bnb_8bit" / "paged_adamw_8bit" keep the moments in one byte each.
    value_layout: PPO's critic, "own_adapter" (a value adapter and its own forward) or "policy_trunk" (neither).
    policy_lm_head: "frozen" (the base's head) or "trainable" (`SharedBaseArguments.policy_lm_head`: the policy
    trains a copy of the LM head, counted in `adapters_optimizer` by `policy_head_bytes`).
    value_lora_embeddings: `SharedBaseArguments.value_lora_embeddings` (PPO with a value adapter): the value role's
    LoRA on the input embeddings, counted in `adapters_optimizer` by `embedding_lora_bytes`.
    shared_prompt: the K-way trainers' `shared_prompt` (on by default where exact): each list runs as one row that
    holds its prompt once (`kway_rows`), with a boolean [L, L] attention mask per row.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if bits not in (4, 8, 16, 32):
        raise ValueError(f"bits must be 4, 8, 16 or 32, got {bits!r}")
    from .models.presets import POLICY_LM_HEADS, VALUE_LAYOUTS

    if policy_lm_head not in POLICY_LM_HEADS:
        raise ValueError(f"policy_lm_head must be one of {POLICY_LM_HEADS}, got {policy_lm_head!r}")
    if value_layout not in VALUE_LAYOUTS:
        raise ValueError(f"value_layout must be one of {VALUE_LAYOUTS}, got {value_layout!r}")
    if value_lora_embeddings and value_layout != "own_adapter":
        raise ValueError("value_lora_embeddings needs value_layout='own_adapter' (a value adapter to hold it)")
    config = load_config(config)
    compute = _compute_dtype(bits, compute_dtype, device)
    adapter = torch.bfloat16 if bits in (4, 8) and compute == torch.bfloat16 else torch.float32
    counts = parameter_counts(config, stage, lora_r, target_modules)
    value_adapter = stage == "ppo" and value_layout == "own_adapter"
    adapters_held = {"ppo": 2, "dpo": 1, "reward": 1}[stage] + value_adapter
    trainable = counts.lora * (1 + value_adapter)
    moment_bytes = 1 if "8bit" in optimizer else _dtype_bytes(adapter)
    adapters_optimizer = trainable * (2 * _dtype_bytes(adapter) + ADAMW_MOMENTS * moment_bytes)
    if policy_lm_head == "trainable" and stage != "reward":  # the reward stage trains no LM head
        adapters_optimizer += policy_head_bytes(config, compute, optimizer)
    if value_lora_embeddings and value_adapter:
        adapters_optimizer += embedding_lora_bytes(config, lora_r, adapter, optimizer)

    kway = stage in ("dpo", "reward")
    shared = kway and shared_prompt
    if kway:
        sequences, length = kway_rows(batch_size, prompt_length, completion_length, num_completions, shared)
    else:
        sequences, length = batch_size, prompt_length + completion_length
    labelled = completion_length * (num_completions if shared else 1)  # completion tokens per row
    forwards = 1 + value_adapter  # PPO with a value adapter: policy and value forwards before one backward
    tokens = sequences * length
    per_layer = saved_bytes_per_token_per_layer(config, compute, lora_r, length, target_modules)
    layers = config.num_hidden_layers
    if gradient_checkpointing:
        inputs = forwards * tokens * layers * config.hidden_size * _dtype_bytes(compute)
        activations = inputs + per_layer * tokens  # one layer rebuilt at a time
    else:
        activations = forwards * tokens * layers * per_layer
    if shared:
        activations += sequences * length * length  # the rows' boolean 4-D attention mask, one byte a pair
    logits = 0 if stage == "reward" else fused_head_bytes(config.vocab_size, sequences, length, labelled, device, stage)
    return MemoryEstimate(
        stage=stage,
        weights=_weights_bytes(counts, bits, compute, adapters_held, adapter),
        adapters_optimizer=int(adapters_optimizer),
        activations=int(activations),
        logits=int(logits),
        runtime=CPU_RUNTIME_BYTES if device == "cpu" else 0,
    )


def kway_rows(batch_size: int, prompt_length: int, completion_length: int, num_completions: int,
              shared_prompt: bool) -> tuple[int, int]:
    """(rows, tokens per row) of a K-way step's forward. Unshared: B x K rows of P + R. Shared
    (rlhf_ext/ops/shared_prompt.py): B rows of P - 1 + K (1 + R), the prompt once and its last token repeated at the
    head of each completion's segment."""
    if shared_prompt:
        return batch_size, prompt_length - 1 + num_completions * (1 + completion_length)
    return batch_size * num_completions, prompt_length + completion_length


def embedding_lora_bytes(config, lora_r: int, adapter: torch.dtype, optimizer: str = "adamw_torch") -> int:
    """Bytes of a LoRA pair on the input embeddings (the value role's with value_lora_embeddings): r x (vocab +
    hidden) weights in the adapters' dtype, with gradient and AdamW's two moments (16 bytes a weight in float32)."""
    text = config.get_text_config()
    moment_bytes = 1 if "8bit" in optimizer else _dtype_bytes(adapter)
    return lora_r * (text.vocab_size + text.hidden_size) * (2 * _dtype_bytes(adapter) + ADAMW_MOMENTS * moment_bytes)


def policy_head_bytes(config, compute: torch.dtype, optimizer: str = "adamw_torch") -> int:
    """Bytes of the policy's trainable LM-head copy: vocab x hidden x (weight + gradient + AdamW's two moments).

    The copy is peft's deep copy of the head, so it has the head's dtype: the compute dtype (the LM head is never
    quantized). torch's AdamW keeps its moments in the parameter's dtype, 8-bit AdamW in one byte each. float32:
    4 + 4 + 2 x 4 = 16 bytes a weight; bfloat16: 8. A tied head costs the same: the copy is a new tensor.
    """
    text = config.get_text_config()
    weight_bytes = _dtype_bytes(compute)
    moment_bytes = 1 if "8bit" in optimizer else weight_bytes
    return text.vocab_size * text.hidden_size * (2 * weight_bytes + ADAMW_MOMENTS * moment_bytes)


def fused_head_bytes(vocab_size: int, sequences: int, length: int, completion_length: int, device: str,
                     stage: str) -> int:
    """Peak bytes of TRL's fused LM head: a few [tokens, vocabulary] float32 tiles, never the [B, T, V] logits.

    GRPOTrainer (PPO) passes only the completion positions (`logits_to_keep`). DPOTrainer passes every position with
    labels -100 outside the completion: with Triton (GPU) only the labelled ones are projected, the torch fallback
    (CPU) projects them all.
    """
    every_position = stage == "dpo" and device != "cuda"
    tokens = sequences * (length if every_position else completion_length)
    tile = min(tokens, FUSED_HEAD_TOKENS) * min(vocab_size, FUSED_HEAD_VOCAB) * 4
    return FUSED_HEAD_TILE_BUFFERS.get(device, FUSED_HEAD_TILE_BUFFERS["cpu"]) * tile


def _compute_dtype(bits: int, compute_dtype: str | None, device: str) -> torch.dtype:
    if bits == 32:
        return torch.float32
    if bits == 16:
        return torch.bfloat16
    if compute_dtype is not None:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[compute_dtype]
    return torch.float32 if device == "cpu" else torch.bfloat16


def near_miss(name: str) -> str | None:
    """The known shape `name` looks like a typo of (not a local folder, not an org/name Hub id), or None."""
    if "/" in name or os.path.isdir(name):
        return None
    close = difflib.get_close_matches(name.lower(), KNOWN_SHAPES, n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_shape(name: str) -> str:
    """The error for a --model that is neither a known shape nor a loadable config."""
    guess = near_miss(name)
    return (
        f"--model {name}: unknown shape; known: {', '.join(KNOWN_SHAPES)}"
        + (f" (did you mean {guess}?)" if guess else "")
        + ". Or give a local folder with a config.json, or a Hub id (org/name) when the Hub is reachable."
    )


# -- the table users print before they rent a GPU -------------------------------------------------------------


def fits(total: int, gpu_gib: float, margin: float = 0.9) -> bool:
    """Whether `total` bytes fit in `gpu_gib` GiB with 10% left for the CUDA context and fragmentation."""
    return total <= margin * gpu_gib * GIB


def assumptions(**kwargs) -> str:
    """Two lines saying the unit and the sizes the table assumed (`estimate`'s defaults for what is not given)."""
    defaults = {name: p.default for name, p in inspect.signature(estimate).parameters.items() if name != "config"}
    s = {**defaults, **kwargs}
    tokens = f"(prompt {s['prompt_length']} tokens + completion {s['completion_length']} tokens)"
    layout = "each prompt computed once" if s["shared_prompt"] else "each completion its own row"
    return (
        f"Predicted peak memory of one training step, in GiB; yes/no: fits a GPU of that size with 10% kept free.\n"
        f"Assumed: PPO batch {s['batch_size']} prompts x {tokens}; K-way DPO and reward batch {s['batch_size']} "
        f"lists x K = {s['num_completions']} x {tokens}, {layout}; "
        f"{s['bits']}-bit base, LoRA r {s['lora_r']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}, {s['optimizer']}."
    )


def table(config, gpus=(24, 48, 80), **kwargs) -> str:
    """One row per stage: the terms in GiB and whether it fits on each GPU size, after a caption naming the unit
    and the batch and lengths assumed."""
    header = f"{'stage':>6} {'weights':>8} {'adapt+opt':>9} {'activ.':>7} {'logits':>7} {'total':>7}" + "".join(
        f" {g:>4}GB" for g in gpus
    )
    rows = [*assumptions(**kwargs).splitlines(), "", header, "-" * len(header)]
    for stage in STAGES:
        est = estimate(config, stage=stage, **kwargs)
        gib = est.gib()
        marks = "".join(f" {'yes' if fits(est.total, g) else 'no':>6}" for g in gpus)
        rows.append(f"{stage:>6} {gib['weights']:>8.2f} {gib['adapters_optimizer']:>9.2f} {gib['activations']:>7.2f}"
                    f" {gib['logits']:>7.2f} {gib['total']:>7.2f}{marks}")
    return "\n".join(rows)


def main(argv=None) -> None:
    from .models.presets import POLICY_LM_HEADS, VALUE_LAYOUTS

    parser = argparse.ArgumentParser(
        prog="python -m rlhf_ext.memory",
        usage="python -m rlhf_ext.memory --model <Hub id | folder | llama-3.1-8b ...> [--bits 4] [--batch_size 8] ...",
        description="Predicted peak GPU memory of a PPO update, a K-way DPO step and a reward step (GiB).",
    )
    parser.add_argument("--model", required=True,
                        help=f"Hub id, local folder with a config.json, or one of {', '.join(KNOWN_SHAPES)}")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8, 16, 32])
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8, help="prompts (PPO) or ranked lists (DPO, reward)")
    parser.add_argument("--prompt_length", type=int, default=512)
    parser.add_argument("--completion_length", type=int, default=256)
    parser.add_argument("--num_completions", type=int, default=4, help="K of the ranked lists")
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    parser.add_argument("--optim", default="adamw_torch", help="TRL/transformers optim name, e.g. adamw_bnb_8bit")
    parser.add_argument("--value_layout", default="own_adapter", choices=VALUE_LAYOUTS,
                        help="PPO's critic: its own value adapter, or a value head on the policy's trunk")
    parser.add_argument("--policy_lm_head", default="frozen", choices=POLICY_LM_HEADS,
                        help="the policy's LM head: the base's, or a trainable copy (PPO and DPO)")
    parser.add_argument("--value_lora_embeddings", action="store_true",
                        help="PPO's value adapter also has LoRA on the input embeddings")
    parser.add_argument("--no_shared_prompt", action="store_true",
                        help="K-way DPO and reward with shared_prompt=False: each completion's row holds the prompt")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.model)
    except (OSError, ValueError) as error:  # offline Hub lookup, or a typo of a known shape
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        parser.error(unknown_shape(args.model) if near_miss(args.model) else f"{unknown_shape(args.model)} ({reason})")
    print(table(config, bits=args.bits, lora_r=args.lora_r, batch_size=args.batch_size,
                prompt_length=args.prompt_length, completion_length=args.completion_length,
                num_completions=args.num_completions, gradient_checkpointing=not args.no_gradient_checkpointing,
                optimizer=args.optim, value_layout=args.value_layout, policy_lm_head=args.policy_lm_head,
                value_lora_embeddings=args.value_lora_embeddings, shared_prompt=not args.no_shared_prompt))


if __name__ == "__main__":
    main()
