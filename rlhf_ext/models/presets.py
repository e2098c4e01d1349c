"""LoRA and quantization presets, and the arguments a recipe exposes for them.

`SharedBaseArguments` is a dataclass with a help string on every field, so `TrlParser` turns it
into `--load_in_4bit`, `--lora_r`, `--lora_alpha`, ... and YAML keys. Its field names follow TRL's
`ModelConfig` (`dtype`, not the `torch_dtype` that transformers 5 deprecated), so a recipe can
swap one for the other; it replaces `ModelConfig` in recipes that build a `SharedBase`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from transformers import BitsAndBytesConfig, PreTrainedModel

# Target modules per `config.model_type`: every projection of attention and MLP, which is what
# QLoRA found necessary to match full fine-tuning. SmolLM and SmolLM2 are `llama`.
LLAMA_STYLE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGET_MODULES: dict[str, list[str]] = {
    "llama": LLAMA_STYLE_TARGETS,
    "qwen2": LLAMA_STYLE_TARGETS,
    "qwen3": LLAMA_STYLE_TARGETS,
    "mistral": LLAMA_STYLE_TARGETS,
    "gemma": LLAMA_STYLE_TARGETS,
    "gemma2": LLAMA_STYLE_TARGETS,
    "gemma3_text": LLAMA_STYLE_TARGETS,
    "smollm3": LLAMA_STYLE_TARGETS,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
# GPT-2 stores its projections as Conv1D with the weight transposed; peft must know.
FAN_IN_FAN_OUT_MODEL_TYPES = {"gpt2"}
# peft's own fallback for an architecture without a preset: every linear layer but the LM head.
ALL_LINEAR = "all-linear"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Where the critic's value head reads its hidden state: the value role's own LoRA adapter, or the policy adapter's
# trunk (one forward and one backward serve policy and value, as in trlX and LLaMA-Factory).
VALUE_LAYOUTS = ("own_adapter", "policy_trunk")
# The policy's output layer: the base's LM head, frozen and shared with the reference ("frozen"), or a trainable copy
# that only the policy adapter reads ("trainable"; peft's `modules_to_save`). LoRA leaves the head frozen, which on
# some tasks keeps the policy below the reward-KL frontier that full fine-tuning reaches (docs/benchmarks.md).
POLICY_LM_HEADS = ("frozen", "trainable")


@dataclass
class SharedBaseArguments:
    """Arguments for loading the shared base and building its LoRA adapters (see `SharedBase`)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model checkpoint (Hub id or local folder) that all four roles share."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of the base model to load."}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the base weights (and the compute dtype of a quantized base).",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation (e.g. 'sdpa', 'eager'); None lets transformers pick."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the base quantized to 4 bits with bitsandbytes (QLoRA)."}
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base quantized to 8 bits with bitsandbytes."})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]}
    )
    use_bnb_nested_quant: bool = field(
        default=True, metadata={"help": "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the policy and value adapters."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input during training."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names that get LoRA. Default: the preset for the base's architecture "
            f"({', '.join(sorted(LORA_TARGET_MODULES))}), else every linear layer but the LM head."
        },
    )
    policy_adapter_path: str | None = field(
        default=None, metadata={"help": "Adapter folder to start the policy from; a fresh LoRA adapter if unset."}
    )
    value_adapter_path: str | None = field(
        default=None, metadata={"help": "Adapter+head folder to start the value model from; fresh if unset."}
    )
    reward_adapter_path: str | None = field(
        default=None,
        metadata={"help": "Adapter+head folder of the reward model (as the K-way reward trainer saves it). Frozen."},
    )
    value_layout: str = field(
        default="own_adapter",
        metadata={
            "help": "Critic layout: 'own_adapter' (value LoRA adapter + head, a second forward and backward per PPO "
            "step) or 'policy_trunk' (value head on the policy adapter's last hidden state: one forward and one "
            "backward serve both, and the value loss also trains the policy adapter).",
            "choices": list(VALUE_LAYOUTS),
        },
    )
    policy_lm_head: str = field(
        default="frozen",
        metadata={
            "help": "The policy's LM head: 'frozen' (the base's, shared with the reference) or 'trainable' (a copy "
            "trained with the policy adapter and saved with it; the reference, value and reward roles keep the "
            "base's head, also when it is tied to the embeddings). Costs vocab x hidden weights with their gradient "
            "and AdamW state (docs/shared-base.md).",
            "choices": list(POLICY_LM_HEADS),
        },
    )
    value_lora_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Also put the value adapter's LoRA on the input embeddings (rank lora_r), so the critic can move "
            "how tokens enter it; the policy, reference and reward roles keep the base's embeddings. Without it the "
            "shared-base critic learns little more than the mean value on some tasks (docs/benchmarks.md). Costs "
            "lora_r x (vocab + hidden) weights. Needs value_layout='own_adapter'.",
        },
    )

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive: pick one.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.value_layout not in VALUE_LAYOUTS:
            raise ValueError(f"value_layout must be one of {VALUE_LAYOUTS}, got {self.value_layout!r}.")
        if self.policy_lm_head not in POLICY_LM_HEADS:
            raise ValueError(f"policy_lm_head must be one of {POLICY_LM_HEADS}, got {self.policy_lm_head!r}.")
        if self.value_lora_embeddings and self.value_layout != "own_adapter":
            # in policy_trunk the value head reads the policy adapter, so there is no value adapter to extend
            raise ValueError("value_lora_embeddings needs value_layout='own_adapter' (a value adapter to hold it).")

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch.dtype."""
        return DTYPES[self.dtype]


def lora_target_modules_for(model_type: str) -> list[str] | str:
    """The preset target modules for an architecture, or "all-linear" for one without a preset."""
    return LORA_TARGET_MODULES.get(model_type, ALL_LINEAR)


def lora_config(args: SharedBaseArguments, model_type: str) -> LoraConfig:
    """The LoraConfig for a trainable role (policy or value) of a base of `model_type`."""
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules or lora_target_modules_for(model_type),
        fan_in_fan_out=model_type in FAN_IN_FAN_OUT_MODEL_TYPES,
        bias="none",
        task_type="CAUSAL_LM",
    )


def policy_lora_config(args: SharedBaseArguments, model: PreTrainedModel) -> LoraConfig:
    """The LoraConfig of the policy role: `lora_config`, plus a trainable copy of the LM head when
    `args.policy_lm_head == "trainable"`.

    peft's `modules_to_save` keeps the original head beside the copy and runs the copy only while the policy adapter
    is active: with adapters disabled (the reference) or another adapter active (value, reward) the original runs.
    On a base whose head is tied to its input embeddings, the copy is a new tensor (peft's default
    `ensure_weight_tying=False`): the policy's output layer unties, its input embeddings and the reference do not.
    """
    config = lora_config(args, model.config.model_type)
    if args.policy_lm_head == "trainable":
        config.modules_to_save = [output_layer_name(model)]
    return config


def value_lora_config(args: SharedBaseArguments, model: PreTrainedModel) -> LoraConfig:
    """The LoraConfig of the value role: `lora_config`, plus the input embeddings as a LoRA target when
    `args.value_lora_embeddings`.

    A LoRA factor pair on the embeddings (peft's `lora_embedding_A/B`) runs only while the value adapter is active, so
    the policy, the reference (adapters disabled) and the reward role look up the base's embeddings; on a tied base
    the LM head keeps reading the unchanged base weight.
    """
    config = lora_config(args, model.config.model_type)
    if args.value_lora_embeddings:
        config.target_modules = [*linear_target_names(config, model), input_embeddings_name(model)]
    if args.policy_lm_head == "trainable":
        # The policy's head copy wraps the LM head (peft's ModulesToSaveWrapper), whose inner Linears no longer carry
        # the head's name, so "all-linear" would put value LoRA inside the wrapper (and saving the policy then fails):
        # keep the value role off the LM head, as peft's "all-linear" means to.
        head = re.escape(output_layer_name(model))
        config.exclude_modules = rf"(.*\.)?{head}(\..*)?"
    return config


def linear_target_names(config: LoraConfig, model: PreTrainedModel) -> list[str]:
    """`config.target_modules` as a list of names, "all-linear" expanded to the model's linear layers by peft (a
    string target cannot be extended by one more module)."""
    if isinstance(config.target_modules, str):
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        config = _maybe_include_all_linear_layers(copy.deepcopy(config), model)
    return sorted(config.target_modules)


def input_embeddings_name(model: PreTrainedModel) -> str:
    """Full module name of the input embeddings (`get_input_embeddings()`), e.g. "model.embed_tokens": a full name,
    because peft matches target modules by suffix."""
    embeddings = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embeddings)


def output_layer_name(model: PreTrainedModel) -> str:
    """Module name of the LM head (`get_output_embeddings()`), e.g. "lm_head"."""
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def quantization_config(args: SharedBaseArguments) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for `--load_in_4bit` (NF4, compute in `dtype`) or `--load_in_8bit`; else None."""
    if args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
            bnb_4bit_compute_dtype=args.torch_dtype,
        )
    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None
