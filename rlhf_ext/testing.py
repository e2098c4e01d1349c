"""Tiny models and tokenizers built from config, and a callback that interrupts training, for tests, benchmarks and
the CI demo.

Nothing here touches the Hugging Face Hub: the tokenizer is a byte-level vocabulary built in memory
and the models are randomly initialised from a config.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
# A minimal chat template, so conversational records work with the tiny tokenizer too.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus <pad>, <s>, </s> (vocab of 101)."""
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(
    vocab_size: int = 101, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, **overrides
) -> LlamaConfig:
    """A Llama config small enough that a forward + backward takes milliseconds on a CPU."""
    tok = tiny_tokenizer()
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_causal_lm(seed: int = 0, **config_overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama, deterministic for a given seed."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config_overrides))


def save_tiny_model(path, seed: int = 0, **config_overrides) -> str:
    """Save a tiny Llama and its tokenizer to `path` (safetensors), so code that takes a model path works."""
    model = tiny_causal_lm(seed=seed, **config_overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


class StopAfter(TrainerCallback):
    """Interrupt training after `step` optimizer steps, as a crash or a preempted job would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def fraction_of_a(completions, **kwargs) -> list[float]:
    """A programmatic reward for tests: the share of 'a' characters in each completion."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def randomize_lora(peft_model, adapter: str, seed: int, scale: float = 0.2) -> None:
    """Random weights for one adapter (peft starts lora_B at 0, under which every adapter computes the base)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if f".{adapter}." in name and ".lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
