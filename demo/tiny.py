"""A tiny random chat model over a vocabulary of English words, for the CI variant of the demo.

`rlhf_ext.testing.save_tiny_model` has a character-level tokenizer: a random model over it writes
strings of random characters, which VADER scores 0.0 every time, so there would be nothing to rank.
Over a vocabulary of whole words (every word of the demo's prompts plus a few dozen words that VADER
rates), random text gets varied scores, and every stage has a real, if trivial, preference to learn.
The model itself is `rlhf_ext.testing`'s tiny Llama config, randomly initialised from a seed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from rlhf_ext.testing import SPECIAL_TOKENS, tiny_llama_config

from .prompts import load_prompts

UNK = "<unk>"
# Words VADER rates, both ways, so random replies range from cold to warm.
RATED_WORDS = (
    "good great happy love lovely nice wonderful kind warm glad fun enjoy best beautiful delightful joy thanks "
    "bad sad terrible awful hate boring angry ugly worst cold miserable pain annoying tired lonely afraid"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def word_vocabulary() -> list[str]:
    """Special tokens (ids 0-2 as in rlhf_ext.testing, then <unk>), then sorted words and punctuation."""
    words = {w for prompt in load_prompts() for w in re.findall(r"\w+|[^\w\s]", prompt.lower())}
    words |= set(RATED_WORDS) | {"system", "user", "assistant", ":", ".", ",", "!"}
    return SPECIAL_TOKENS + [UNK] + sorted(words)


def tiny_word_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over `word_vocabulary()`, with a chat template."""
    vocab = {token: i for i, token in enumerate(word_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    # Special tokens are matched before pre-tokenization, so "<s>" survives the punctuation split.
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=UNK
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_word_model(path: str | Path, seed: int = 0) -> str:
    """Save a tiny random Llama over the word vocabulary, and its tokenizer, to `path` (safetensors)."""
    tokenizer = tiny_word_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
