"""Generation that prefills each distinct prompt once (the `shared_prompt` switch, at sampling time).

GRPOTrainer's transformers path gives `generate` each prompt G = num_generations times (consecutive, left-padded
rows), so the prompt's prefill, its most expensive forward, runs G times. `generate_with_shared_prefill` finds the
distinct rows (input ids and attention mask both equal), runs the model once over their first P - 1 columns into a
`DynamicCache`, copies each distinct row's cache to the rows that repeat it (`Cache.batch_select_indices`), and then
calls the model's own `generate` with that cache and the whole batch: generate sees a cache of P - 1 columns, so it
runs only the last prompt column (positions from the full attention mask, as always) and samples as before. The
tokens, and the per-step scores up to floating-point rounding, are what plain `generate` gives.

`shared_prefill_problem` says where this cannot be exact (an encoder-decoder, a cache that is not plain full
attention, beam search, multimodal inputs, `use_cache=False`, ...); `generate_with_shared_prefill` then runs plain
`generate`, as it does when no row repeats. `shared_prefill_generation` makes a model's `generate` go through it for
the duration of a `with` block (the trainers' `SharedPrefillGenerationMixin` wraps GRPOTrainer's generation in it).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer
from transformers.generation.configuration_utils import GenerationMode

from .shared_prompt import peft_adapter_problem, unwrap

# the generation modes that run one cached forward per new token over the batch as it is (no beam reordering, no
# candidate tokens from an assistant), so a cache handed to `generate` is used as generate would build it
SHARED_PREFILL_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
# the tensors `generate` is given that the prefill itself reads
PREFILL_TENSORS = ("input_ids", "attention_mask")
# marks a `generate` replaced by `shared_prefill_generation`, so a nested block does not wrap it twice
_PATCH_MARK = "_rlhf_ext_shared_prefill"


def forward_parameters(model: nn.Module) -> set[str]:
    """The parameters of the transformers model's own forward (inside DDP and peft): the class's, since TRL's fused LM
    head replaces the instance's `forward` by a wrapper that takes anything and passes it on."""
    return set(inspect.signature(type(unwrap(model)).forward).parameters)


def cache_argument(model: nn.Module) -> str:
    """The name under which the model's forward takes the KV cache: `cache` since transformers 5.25 (which still
    accepts the old name with a deprecation warning), `past_key_values` before."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def resolved_generation_config(model: nn.Module, generate_kwargs: dict) -> GenerationConfig:
    """The generation settings a `generate(**generate_kwargs)` call runs with: its `generation_config` (else the
    model's), with the keyword arguments that name a setting applied on a copy."""
    config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None) or GenerationConfig()
    config = copy.deepcopy(config)
    config.update(**{key: value for key, value in generate_kwargs.items() if key != "generation_config"})
    return config


def _model_problem(model: nn.Module) -> str | None:
    """Why the model's prompt cannot be prefilled apart from `generate` (see `shared_prefill_problem`), or None."""
    adapter = peft_adapter_problem(model, "generate's own inputs")
    if adapter is not None:
        return adapter
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None:
        return f"{type(base).__name__} has no transformers config"
    if getattr(config, "is_encoder_decoder", False):
        return f"{type(base).__name__} is an encoder-decoder"
    if hasattr(config, "get_text_config") and config.get_text_config(decoder=True) is not config:
        return f"{type(base).__name__} is a composite (multimodal) model"
    if not getattr(type(base), "_supports_default_dynamic_cache", lambda: True)():
        return f"{type(base).__name__} keeps no DynamicCache (a recurrent state)"
    layers = {type(layer).__name__ for layer in DynamicCache(config=config).layers if type(layer) is not DynamicLayer}
    if layers:
        return (f"{type(base).__name__}'s cache has {', '.join(sorted(layers))} layers (a sliding window, chunked or "
                "linear attention), not only full-attention ones")
    if "position_ids" not in forward_parameters(model):
        return f"{type(base).__name__}.forward takes no position_ids"
    return None


def _settings_problem(model: nn.Module, generate_kwargs: dict) -> str | None:
    """Why this call's generation settings rule out a cache prefilled apart from `generate`, or None."""
    config = resolved_generation_config(model, generate_kwargs)
    if config.use_cache is False:
        return "use_cache=False: generate keeps no cache"
    if config.cache_implementation is not None:
        return f"cache_implementation={config.cache_implementation!r}: generate builds its own cache"
    mode = config.get_generation_mode(generate_kwargs.get("assistant_model"))
    if mode not in SHARED_PREFILL_MODES:
        return f"the generation mode is {mode.value}, not greedy search or sampling"
    if (config.num_return_sequences or 1) != 1:
        return f"num_return_sequences={config.num_return_sequences} expands the rows inside generate"
    if config.output_attentions or config.output_hidden_states:
        return "per-step attentions or hidden states are asked for, and the first step would hold only the last column"
    return None


def _inputs_problem(generate_kwargs: dict) -> str | None:
    """Why the tensors given to `generate` rule out the prefill (multimodal inputs, a cache, embeddings), or None."""
    if generate_kwargs.get("cache") is not None or generate_kwargs.get("past_key_values") is not None:
        return "generate is given a cache already"
    extra = sorted(key for key, value in generate_kwargs.items()
                   if isinstance(value, torch.Tensor) and key not in PREFILL_TENSORS)
    if extra:
        return (f"generate is given {', '.join(extra)} (multimodal inputs or embeddings), which the prefill does not "
                "take")
    return None


def shared_prefill_problem(model: nn.Module, **generate_kwargs) -> str | None:
    """Why `generate(**generate_kwargs)` cannot run from a cache prefilled outside it, exactly (a phrase naming the
    setting), or None when it can.

    Needs a decoder-only text model with no dropout active, whose cache is a `DynamicCache` of full-attention layers
    (a sliding window's, a linear attention's or a static cache's layers are not copied here) and that takes position
    ids; no
    prompt-learning adapter (virtual tokens) or activated LoRA; greedy search or sampling with one sequence per row,
    the cache on and no cache implementation named; no tensors besides input_ids and attention_mask (pixel values,
    token type ids, inputs_embeds) and no cache given; no per-step attentions or hidden states asked for.
    """
    return (_model_problem(model) or _dropout_problem(model) or _settings_problem(model, generate_kwargs)
            or _inputs_problem(generate_kwargs))


def _dropout_problem(model: nn.Module) -> str | None:
    """Why sampling in training mode with dropout active is not exact with a shared prefill, or None: the prompt's
    one prefill draws one dropout mask where G prefills drew G, so the samples differ from plain generate's (TRL samples
    in training mode; PPO's `disable_dropout=True` default sets every dropout to 0)."""
    active = [name for name, module in unwrap(model).named_modules()
              if isinstance(module, nn.Dropout) and module.p > 0 and module.training]
    if not active:
        return None
    return (f"dropout is active while sampling ({len(active)} dropout layer(s), e.g. {active[0]}): one prefill draws "
            "one dropout mask for a prompt's G samples; disable_dropout=True makes it exact")


def distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first [U], of_row [B]): the index of each distinct row's first occurrence, in batch order, and for each row
    the position in `first` of the distinct row it repeats; a row is (input ids, attention mask). None when no row
    repeats (nothing to share)."""
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
    count, batch = unique.size(0), rows.size(0)
    if count == batch:
        return None
    # torch.unique sorts the rows; number them by first occurrence instead, so the prefill keeps the batch order
    index = torch.arange(batch, device=rows.device)
    first = torch.full((count,), batch, device=rows.device).scatter_reduce(0, inverse, index, reduce="amin")
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(count, device=rows.device)
    return first[order], rank[inverse]


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids `generate` gives a left-padded batch: the count of real tokens before each one, 0 on padding
    (GenerationMixin._prepare_position_ids_for_generation), so the prefill numbers the prompt as plain generate does."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def prefilled_cache(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DynamicCache | None:
    """The `DynamicCache` over all columns of `input_ids` [U, P - 1], from the transformers model's forward, the one
    generate's own steps call (peft's generate calls it too, with LoRA layers injected into its modules), with the
    LM head on the last column only (`logits_to_keep=1`, where the model takes it: the logits are not used). None when
    the forward did not fill the cache with every column (a forward that takes the cache under another name)."""
    base = unwrap(model)
    cache = DynamicCache(config=base.config.get_text_config(decoder=True))
    head = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}
    base(input_ids=input_ids, attention_mask=attention_mask, position_ids=generation_positions(attention_mask),
         use_cache=True, **{cache_argument(model): cache}, **head)
    return cache if cache.get_seq_length() == input_ids.size(1) else None


def generate_with_shared_prefill(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                                 generate: Callable | None = None, on_unshared: Callable[[str], None] | None = None,
                                 **generate_kwargs):
    """`generate(input_ids=..., attention_mask=..., **generate_kwargs)`, each distinct prompt row prefilled once.

    `generate`: the generate to call (the model's by default; `shared_prefill_generation` passes the one it replaced).
    Plain generate runs where no row repeats or the prompt is one column wide (nothing to share), and where
    `shared_prefill_problem` names a reason, or the forward left the cache unfilled: then `on_unshared(reason)` is
    called first, if given. Returns what generate returns.
    """
    generate = generate if generate is not None else model.generate
    plain = dict(generate_kwargs, input_ids=input_ids, attention_mask=attention_mask)
    rows = distinct_rows(input_ids, attention_mask) if input_ids.size(1) > 1 else None
    if rows is None:
        return generate(**plain)
    problem = shared_prefill_problem(model, **generate_kwargs)
    cache = None
    if problem is None:
        first, of_row = rows
        with torch.no_grad():  # generate's own forwards run without autograd too
            cache = prefilled_cache(model, input_ids[first, :-1], attention_mask[first, :-1])
        if cache is None:
            problem = "the model's forward left the cache it was given unfilled"
    if problem is not None:
        if on_unshared is not None:
            on_unshared(problem)
        return generate(**plain)
    cache.batch_select_indices(of_row)  # each row gets the cache of the distinct prompt it repeats
    return generate(**plain, **{cache_argument(model): cache})


@contextmanager
def shared_prefill_generation(model: nn.Module, on_unshared: Callable[[str], None] | None = None) -> Iterator[None]:
    """While active, `model.generate(...)` (an instance attribute shadowing the class's method, removed on exit) is
    `generate_with_shared_prefill` over the `generate` it replaced. A call without input ids and an attention mask
    runs that generate as it is. Nested blocks on one model wrap it once."""
    if getattr(model.generate, _PATCH_MARK, False):
        yield
        return
    had_own = "generate" in vars(model)
    original = model.generate

    def generate(*args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if len(args) > 1 or input_ids is None or kwargs.get("attention_mask") is None:
            return original(*args, **kwargs)
        kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask")
        return generate_with_shared_prefill(model, input_ids, attention_mask, generate=original,
                                            on_unshared=on_unshared, **kwargs)

    setattr(generate, _PATCH_MARK, True)
    model.generate = generate
    try:
        yield
    finally:
        if had_own:
            model.generate = original
        else:
            del model.generate
