"""The model side of "each prompt computed once" (layout: `rlhf_ext.ops.shared_prompt`).

`shared_prompt_blocker` says why a model cannot run the shared layout exactly (or None); `SharedPromptBatch` is an
unshared K-way batch rebuilt as shared rows; `shared_token_outputs` (a causal LM with TRL's fused LM head: K-way DPO)
and `shared_sequence_scores` (a sequence classifier: the K-way reward model) run one forward on the shared rows and
give back what the unshared forward gives, in its shape: per-token values [N, T - 1], scores [N, num_labels].
`grouped_inputs` reads GRPOTrainer's rows (left-padded prompts; the rows of one prompt = a list, wherever they sit in
the batch) as such a batch, and `shared_completion_outputs` gives back what GRPOTrainer's forward keeps, [N, C]
(online K-way, PPO); `completion_token_values` reads any per-position value (a critic's V) the same way.

The attention mask goes to the model as a 4-D tensor [R, 1, L, L]. transformers 5 (`masking_utils.
_preprocess_mask_arguments`) passes a 4-D mask to the attention function as it is, so it must already be in that
function's format: boolean, True = attend, for sdpa (what `masking_utils.sdpa_mask` builds); additive float, 0 or the
dtype's minimum, for eager (`eager_mask`, which the eager attention adds to the scores). flash-attention ignores a
4-D mask, flex-attention wants a BlockMask.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.shared_prompt import (
    IGNORE_INDEX,
    SharedPromptLayout,
    attention_allowed,
    block_lengths,
    completion_columns,
    gather_shared,
    grouped_rows_problem,
    layout_problem,
    next_token_labels,
    prompt_and_sequence_lengths,
    read_last_tokens,
    right_padded_rows,
    rows_by_cost,
    rows_by_prompt,
    scatter_to_unshared,
    shared_prompt_layout,
)
from .scoring import capture_output, score_module

# attention implementations that read a 4-D attention mask as given (see the module docstring)
MASK_FORMATS = {"sdpa": "bool", "eager": "additive"}
# per-token fields of TRL's FusedCausalLMOutput, [rows, positions] with shift_labels
_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed (`.module`) and peft (`get_base_model()`)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attention_window(config) -> tuple[str, int] | None:
    """The narrowest local-attention span of the model, as (setting, tokens): a sliding window or chunked attention
    that some layer uses; None when every layer attends globally."""
    spans = []
    layer_types = getattr(config, "layer_types", None)
    sliding = getattr(config, "sliding_window", None)
    if sliding is not None and getattr(config, "use_sliding_window", True) is not False:
        if layer_types is None or any("sliding" in str(kind) for kind in layer_types):
            spans.append(("sliding window (sliding_window", int(sliding)))
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is not None and (layer_types is None or any("chunked" in str(kind) for kind in layer_types)):
        spans.append(("chunked attention (attention_chunk_size", int(chunk)))
    return min(spans, key=lambda span: span[1]) if spans else None


def peft_adapter_problem(model: nn.Module, invocation_read_in: str) -> str | None:
    """Why the active peft adapter rules out computing a prompt apart from its completions, or None: a prompt-learning
    adapter prepends virtual tokens; an activated LoRA finds its invocation tokens in `invocation_read_in`."""
    peft_config = getattr(getattr(model, "module", model), "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return f"the peft adapter is a prompt-learning one ({peft_config.peft_type}), which prepends virtual tokens"
    if peft_config is not None and getattr(peft_config, "alora_invocation_tokens", None):
        return f"the peft adapter is an activated LoRA, which finds its invocation tokens in {invocation_read_in}"
    return None


def shared_prompt_blocker(model: nn.Module, *, max_length: int | None, scores: bool = False) -> str | None:
    """Why `model` cannot compute the shared layout exactly (a phrase naming the setting), or None when it can.

    Exact needs a decoder whose attention is causal, global (or local over a span the longest sequence fits in:
    max_length <= window), without soft-capping, that takes position ids and reads a 4-D mask (sdpa, eager); no
    prompt-learning adapter (virtual tokens) or activated LoRA; no MoE router loss (it counts the prompt's tokens K
    times unshared). `scores`: a sequence classifier must score with a per-token `score` layer (an encoder classifier
    pools its first token, and attends both ways).
    """
    adapter = peft_adapter_problem(model, "the unshared rows")
    if adapter is not None:
        return adapter
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None:
        return f"{type(base).__name__} has no transformers config"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    backbone = getattr(base, "base_model", base)  # the decoder that builds the mask (what TRL's fused head calls)
    if not type(backbone).__module__.startswith("transformers.models."):
        return (f"{type(backbone).__name__} is not a transformers model class (remote code), so its mask handling is "
                "unknown")
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in MASK_FORMATS:
        return (f"attn_implementation={implementation!r}: only 'sdpa' and 'eager' read a 4-D attention mask "
                "(flash-attention ignores it)")
    if getattr(text, "is_encoder_decoder", False) or not getattr(text, "is_causal", True) or getattr(
            text, "use_bidirectional_attention", False):
        return f"{type(base).__name__} does not attend causally (an encoder or bidirectional attention)"
    if scores and score_module(model) is None:
        return f"{type(base).__name__} has no per-token `score` layer (an encoder classifier pooling its first token)"
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return f"the attention is soft-capped (attn_logit_softcapping={text.attn_logit_softcapping})"
    if getattr(text, "alibi", False) or getattr(text, "position_embedding_type", None) == "alibi":
        return "the model's ALiBi attention bias is computed from token indices, not position ids"
    window = _attention_window(text)
    if window is not None and (max_length is None or max_length > window[1]):
        return (f"the model uses a {window[0]}={window[1]}) and max_length={max_length} allows longer sequences, "
                "where the window would bite: the shared rows' 4-D mask does not hold it")
    if getattr(text, "output_router_logits", False):
        return ("the MoE router load-balancing loss (output_router_logits=True) averages over the tokens, and counts "
                "each prompt token K times unshared")
    if "position_ids" not in inspect.signature(backbone.forward).parameters:
        return f"{type(backbone).__name__}.forward takes no position_ids"
    source = inspect.getmodule(type(backbone))
    if not any(hasattr(source, name) for name in ("create_causal_mask", "create_sliding_window_causal_mask")):
        return f"{type(backbone).__name__} does not build its mask with transformers' masking_utils"
    return None


def attention_span(model: nn.Module) -> float | None:
    """The row width W at which a token's attention costs its linear layers, per layer, with a dense mask:

        4 * heads * head_dim * W  (scores and values)  =  2 * (2 H heads head_dim + 2 H kv_heads head_dim + 3 H I)

    (a gated MLP of intermediate size I assumed). 4608 for hidden 768 / intermediate 2048. None when the config
    does not say (then each list keeps its own row)."""
    try:
        text = unwrap(model).config.get_text_config()
        hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate
    return 2 * per_layer / (4 * heads * head_dim)


def model_attention_mask(allowed: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The 4-D mask [R, 1, L, L] in the format `model`'s attention reads: bool for sdpa, additive float for eager."""
    base = unwrap(model)
    if MASK_FORMATS.get(base.config._attn_implementation) == "bool":
        return allowed
    dtype = base.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class SharedPromptBatch:
    """An unshared K-way batch rebuilt as shared rows: what the model is given, and the layout to map results back.

    input_ids [R, L], position_ids [R, L], labels [R, L] (the next-token label of each position, -100 where none),
    allowed bool [R, 1, L, L] (`rlhf_ext.ops.shared_prompt.attention_allowed`).
    """

    layout: SharedPromptLayout
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    allowed: torch.Tensor

    @classmethod
    def from_inputs(cls, inputs: dict, *, pack: bool | float = False, pad_to_multiple_of: int | None = None):
        """Build from the K-way collator's keys (input_ids, attention_mask, completion_mask, num_completions), and
        unshared_position_ids [N, T] where a token's position in the unshared forward is not its column
        (`grouped_inputs`; a key of its own: a collator's `position_ids` never reach the unshared forward).

        pack: False, one row per list; True, every list in one row; a number, the `attention_span` by which
        `rows_by_cost` groups the lists into rows."""
        masks = inputs["attention_mask"], inputs["completion_mask"], inputs["num_completions"]
        if pack is True or pack is False:
            rows = [list(range(len(inputs["num_completions"])))] if pack else None
        else:
            rows = rows_by_cost(block_lengths(*masks), float(pack))
        layout = shared_prompt_layout(*masks, rows=rows, pad_to_multiple_of=pad_to_multiple_of)
        labels = next_token_labels(inputs["input_ids"], inputs["completion_mask"])
        positions = inputs.get("unshared_position_ids")  # the unshared rows' own positions, if not their columns
        return cls(
            layout=layout,
            input_ids=gather_shared(inputs["input_ids"], layout, fill=0),
            position_ids=layout.source_position if positions is None else gather_shared(positions, layout, fill=0),
            labels=gather_shared(labels, layout, fill=IGNORE_INDEX),
            allowed=attention_allowed(layout),
        )

    @staticmethod
    def problem(inputs: dict) -> str | None:
        """Why this batch cannot be shared (`rlhf_ext.ops.shared_prompt.layout_problem`), or None."""
        return layout_problem(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"],
                              inputs["num_completions"])

    def model_inputs(self, model: nn.Module) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": model_attention_mask(self.allowed, model),
                "position_ids": self.position_ids, "use_cache": False}


def shared_token_outputs(model: nn.Module, batch: SharedPromptBatch, **kwargs):
    """One forward of a causal LM carrying TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) on the shared
    rows; its per-token fields (log_probs, entropy, mean_logits, is_top1, ...) come back as the unshared forward gives
    them, [N, T - 1], column t the prediction of token t + 1, 0 where there is no completion label.

    The labels are given pre-shifted (`shift_labels`): in a shared row a position's next token is not the next
    column (a segment's last token is followed by the next segment).
    """
    outputs = model(**batch.model_inputs(model), shift_labels=batch.labels, fused_lm_head=True, **kwargs)
    for name in _TOKEN_FIELDS:
        value = getattr(outputs, name, None)
        if value is not None:
            setattr(outputs, name, scatter_to_unshared(value, batch.layout, batch.labels))
    return outputs


def shared_sequence_scores(model: nn.Module, batch: SharedPromptBatch) -> torch.Tensor:
    """Scores [N, num_labels] of a decoder sequence classifier, each read at its sequence's last token in the shared
    rows: the hidden state the unshared row has at its last real token (`rlhf_ext.models.scoring`'s rule), so the
    `score` layer sees the same input. The model runs its normal forward (DDP, DeepSpeed, peft see the call)."""
    with capture_output(score_module(model)) as outputs:
        model(**batch.model_inputs(model))
    return read_last_tokens(outputs[-1], batch.layout)


@dataclass
class GroupedRows:
    """GRPOTrainer's unshared rows as the keys `SharedPromptBatch.from_inputs` reads: the rows that hold one prompt
    gathered into a list (`rows_by_prompt`), shifted to right-padded `[prompt | completion]` rows
    (`rlhf_ext.ops.shared_prompt.right_padded_rows`), each token keeping its unshared position (its column there).

    inputs   input_ids, attention_mask, completion_mask, unshared_position_ids [N, T] in grouped order, and
             num_completions [G] (rows per prompt)
    order    long [N]: the unshared row at each grouped row; `ungroup` puts per-row results back in batch order
    """

    inputs: dict
    order: torch.Tensor

    def chunks(self, max_rows: int | None):
        """The grouped rows in chunks of whole lists, each at most `max_rows` rows (or one list, when a list alone is
        longer): the shape of GRPOTrainer's chunked forward, each prompt in one chunk."""
        sizes = self.inputs["num_completions"].tolist()
        limit = max_rows or sum(sizes)
        start, first_list = 0, 0
        for end_list in range(1, len(sizes) + 1):
            rows = sum(sizes[first_list:end_list])
            if end_list == len(sizes) or rows + sizes[end_list] > limit:
                chunk = {key: value[start : start + rows] for key, value in self.inputs.items()
                         if key != "num_completions"}
                chunk["num_completions"] = self.inputs["num_completions"][first_list:end_list]
                yield chunk
                start, first_list = start + rows, end_list

    def ungroup(self, per_row: torch.Tensor) -> torch.Tensor:
        """Per-row results in grouped order [N, ...] back in the unshared batch's order."""
        return per_row[torch.argsort(self.order)]


def grouped_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_length: int) -> tuple[GroupedRows | None, str | None]:
    """GRPOTrainer's rows with each prompt's rows gathered into one list: (GroupedRows, None); (None, why not) for rows
    the layout cannot read; (None, None) when no two rows hold the same prompt (nothing to share).

    The rows are those of `GRPOTrainer._get_per_token_logps_and_entropies`: input_ids = prompt_ids then completion_ids
    [N, T], attention_mask = prompt_mask (left padded) then completion_mask (right padded), the last
    `completion_length` columns the completion. A rollout holds GRPO's groups of `num_generations` consecutive rows;
    PPO's loss a shuffled micro-batch, in which a prompt's rows are wherever the shuffle put them.
    """
    prompt_width = input_ids.shape[1] - completion_length
    prompt_mask = attention_mask[:, :prompt_width]
    problem = grouped_rows_problem(prompt_mask, attention_mask[:, prompt_width:])
    if problem is not None:
        return None, problem
    order, sizes = rows_by_prompt(input_ids[:, :prompt_width], prompt_mask)
    if int(sizes.max()) < 2:
        return None, None
    inputs = right_padded_rows(input_ids[order], prompt_mask[order], attention_mask[order, prompt_width:])
    inputs["unshared_position_ids"] = inputs.pop("position_ids")
    inputs["num_completions"] = sizes
    return GroupedRows(inputs=inputs, order=order), None


def prompt_prefix_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts: list) -> GroupedRows | None:
    """Right-padded whole sequences [N, T] (a reward model's prompt + completion texts, tokenized) with the rows of one
    prompt (equal entries of `prompts`) gathered into a list whose shared part is the token prefix all its rows hold,
    at most each row's length - 1 tokens (so every row keeps a token of its own to be read at); None when no prompt has
    two rows.

    The prefix is read from the tokens, not assumed from the text: where a tokenizer merges the prompt's last
    characters with the completion's first, the rows share fewer tokens and the layout shares only those, so the
    forward stays exact whatever the tokenization.
    """
    first_of = {}
    group = torch.tensor([first_of.setdefault(repr(prompt), len(first_of)) for prompt in prompts],
                         device=input_ids.device)
    sizes = torch.bincount(group)
    if int(sizes.max()) < 2:
        return None
    order = torch.sort(group, stable=True).indices
    ids, mask = input_ids[order], attention_mask[order].long()
    list_of_row = torch.repeat_interleave(torch.arange(len(sizes), device=ids.device), sizes)
    first_row = (torch.cumsum(sizes, 0) - sizes)[list_of_row]
    agrees = (ids == ids[first_row]) & (mask == 1) & (mask[first_row] == 1)
    own_prefix = torch.minimum(agrees.long().cumprod(dim=1).sum(dim=1), mask.sum(dim=1) - 1)
    prefix = torch.full_like(sizes, ids.shape[1]).scatter_reduce(0, list_of_row, own_prefix, reduce="amin")
    columns = torch.arange(ids.shape[1], device=ids.device)
    completion_mask = mask * (columns[None, :] >= prefix[list_of_row][:, None]).long()
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion_mask, "num_completions": sizes}
    return GroupedRows(inputs=inputs, order=order)


def completion_token_values(per_token: torch.Tensor, batch: SharedPromptBatch, inputs: dict,
                            completion_length: int) -> torch.Tensor:
    """Per-position values of the shared rows [R, L] (a fused LM head's log-probs, a value head's V) read where the
    unshared forward reads them for each completion token: [N, C], column j at the position that predicts completion
    token j (the state before it), 0 past the completion. `inputs` as `GroupedRows` holds them, in grouped order."""
    prompt_lengths, _ = prompt_and_sequence_lengths(inputs["attention_mask"], inputs["completion_mask"])
    unshared = scatter_to_unshared(per_token, batch.layout, batch.labels)
    return completion_columns(unshared, prompt_lengths, completion_length)


def shared_completion_outputs(model: nn.Module, batch: SharedPromptBatch, inputs: dict, completion_length: int):
    """`shared_token_outputs` with its per-token fields read at each sequence's completion, [N, C]: what
    GRPOTrainer's unshared forward keeps (`outputs.log_probs[:, -logits_to_keep:]`), column j the prediction of
    completion token j, 0 past the completion. `inputs` one chunk of `GroupedRows`, in grouped order."""
    outputs = model(**batch.model_inputs(model), shift_labels=batch.labels, fused_lm_head=True)
    for name in _TOKEN_FIELDS:
        value = getattr(outputs, name, None)
        if value is not None:
            setattr(outputs, name, completion_token_values(value, batch, inputs, completion_length))
    return outputs
