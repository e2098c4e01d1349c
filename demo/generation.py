"""Batched chat generation and completion log-probabilities, shared by sampling (stage 1) and
evaluation (stage 5).

Prompts are rendered with the tokenizer's chat template and left-padded, so every completion
starts at the same column. A completion runs up to and including its first end-of-sequence token;
what `generate` appends after that is padding and is masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled. top_k=0 and top_p=1.0 sample from the model's own distribution,
    which the KL estimate in evaluation requires."""

    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class GeneratedBatch:
    """One batch of sampled completions; row i*num_samples + j is sample j of prompt i."""

    sequences: torch.Tensor  # [N, P + T] prompt (left-padded) followed by completion tokens
    attention_mask: torch.Tensor  # [N, P + T] 1 on real prompt tokens and real completion tokens
    prompt_length: int  # P: completion tokens start at this column
    completion_mask: torch.Tensor  # [N, T] True on completion tokens up to and including the first EOS
    texts: list[str]  # N decoded completions, special tokens removed
    # [N, T] log-probability of each completion token under the sampling model at temperature 1 (0 off the
    # mask), read from generate()'s logits; only when sample_batch(..., with_logprobs=True)
    logprobs: torch.Tensor | None = None


def load_model_and_tokenizer(model_path: str, adapter_path: str | None = None):
    """A causal LM in eval mode and its tokenizer; a peft adapter at `adapter_path` is merged into the weights
    (evaluation never trains, and merged LoRA layers generate as fast as the base's)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    return model.eval(), tokenizer


def chat_batch(tokenizer, conversations: list[list[dict[str, str]]]) -> dict[str, torch.Tensor]:
    """Conversations rendered with the chat template, the assistant turn opened, left-padded."""
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    tokenizer.padding_side = "left"
    # The chat template already writes any BOS it wants; adding special tokens again would double it.
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def mask_after_first_eos(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[N, T] bool: True up to and including the first EOS of each row (all True when a row has none)."""
    is_eos = completion_ids == eos_token_id
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return eos_before == 0


@torch.no_grad()
def sample_batch(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    num_samples: int,
    sampling: SamplingConfig,
    with_logprobs: bool = False,
) -> GeneratedBatch:
    """`num_samples` sampled completions for each conversation, decoded and masked; with `with_logprobs`, also
    their log-probabilities under `model`, which saves the second forward pass of `completion_logprobs`."""
    inputs = chat_batch(tokenizer, conversations)
    outputs = model.generate(
        **inputs,
        do_sample=True,
        num_return_sequences=num_samples,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True,
        output_logits=with_logprobs,
    )
    sequences = outputs.sequences
    prompt_length = inputs["input_ids"].shape[1]
    completion_ids = sequences[:, prompt_length:]
    completion_mask = mask_after_first_eos(completion_ids, tokenizer.eos_token_id)
    logprobs = None
    if with_logprobs:
        # `logits` are the model's raw scores at each step, before temperature and top-k/top-p.
        logits = torch.stack(outputs.logits, dim=1).float()
        logprobs = token_logprobs(logits, completion_ids) * completion_mask
    prompt_mask = inputs["attention_mask"].repeat_interleave(num_samples, dim=0)
    texts = [
        tokenizer.decode(ids[mask], skip_special_tokens=True).strip()
        for ids, mask in zip(completion_ids, completion_mask)
    ]
    return GeneratedBatch(
        sequences=sequences,
        attention_mask=torch.cat([prompt_mask, completion_mask.long()], dim=1),
        prompt_length=prompt_length,
        completion_mask=completion_mask,
        texts=texts,
        logprobs=logprobs,
    )


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[N, T] log softmax(logits)[token]: `logits` [N, T, V] are the scores that predicted `token_ids` [N, T]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def completion_logprobs(model, batch: GeneratedBatch) -> torch.Tensor:
    """[N, T] log-probability of each completion token under `model` (0 where the mask is False)."""
    # Positions count real tokens only, as generate() does, so left padding does not shift them.
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=batch.sequences, attention_mask=batch.attention_mask, position_ids=position_ids
    ).logits
    # The logit at column c predicts the token at column c + 1.
    completion_logits = logits[:, batch.prompt_length - 1 : -1].float()
    return token_logprobs(completion_logits, batch.sequences[:, batch.prompt_length :]) * batch.completion_mask
