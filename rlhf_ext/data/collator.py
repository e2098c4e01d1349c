"""K-way collator: B ranked lists -> one padded batch of N = K_1 + ... + K_B sequences.

Sequences are laid out list by list, each list best first, so one forward pass scores every completion of
the batch; `split_into_lists` turns the N per-sequence values back into a [B, K_max] table.

This stays the batch format wherever the K-way trainers compute each prompt once (`shared_prompt`): they rebuild
the batch as one row per list from these tensors (`rlhf_ext.ops.shared_prompt`, which checks the layout below and
that the K rows of a list hold the same prompt), and the per-sequence results come back in this layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import pad


def list_mask(num_completions: torch.Tensor) -> torch.Tensor:
    """mask[b, k] = k < K_b. num_completions: long [B] -> bool [B, K_max]."""
    positions = torch.arange(int(num_completions.max()), device=num_completions.device)
    return positions.unsqueeze(0) < num_completions.unsqueeze(1)


def split_into_lists(values: torch.Tensor, num_completions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Regroup per-sequence values [N] (list by list) into table [B, K_max], 0 where mask [B, K_max] is False."""
    rows = torch.split(values, num_completions.tolist())
    return pad_sequence(rows, batch_first=True), list_mask(num_completions)


@dataclass
class DataCollatorForRankedPreference(DataCollatorMixin):
    """Collate tokenized ranked lists (`prompt_ids`, `completion_ids`, `num_ranked`, optional `ref_logps`).

    Returns, with N = sum_b K_b and T the longest prompt+completion:
        num_completions  long [B]     K_b; first key, so `Trainer` counts a batch in lists, not sequences
        input_ids        long [N, T]  prompt + completion, right-padded with `pad_token_id`
        attention_mask   long [N, T]
        completion_mask  long [N, T]  1 on completion tokens
        num_ranked       long [B]     ranked positions per list (see `rlhf_ext.data.ranked`)
        ref_logps        float [B, K_max], only when the examples carry precomputed reference log-probs
        margin           float [B], only when the examples carry TRL's reward margin

    Truncation happens once, in `prepare_ranked_dataset`, where it is counted; the collator only pads.

    Example:
        >>> collator = DataCollatorForRankedPreference(pad_token_id=0)
        >>> batch = collator([
        ...     {"prompt_ids": [1, 2], "completion_ids": [[3], [4, 5], [6]], "num_ranked": 2},
        ...     {"prompt_ids": [7], "completion_ids": [[8, 9], [5]], "num_ranked": 1},
        ... ])
        >>> batch["input_ids"].tolist()
        [[1, 2, 3, 0], [1, 2, 4, 5], [1, 2, 6, 0], [7, 8, 9, 0], [7, 5, 0, 0]]
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences, completion_masks = [], []
        for example in examples:
            prompt = example["prompt_ids"]
            for completion in example["completion_ids"]:
                sequences.append(torch.tensor(prompt + completion, dtype=torch.long))
                completion_masks.append(torch.tensor([0] * len(prompt) + [1] * len(completion), dtype=torch.long))
        attention_masks = [torch.ones_like(ids) for ids in sequences]
        padding = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
        batch = {
            "num_completions": torch.tensor([len(ex["completion_ids"]) for ex in examples], dtype=torch.long),
            "input_ids": pad(sequences, padding_value=self.pad_token_id, **padding),
            "attention_mask": pad(attention_masks, padding_value=0, **padding),
            "completion_mask": pad(completion_masks, padding_value=0, **padding),
            "num_ranked": torch.tensor([ex["num_ranked"] for ex in examples], dtype=torch.long),
        }
        if "margin" in examples[0]:  # TRL's reward margin (K=2 lists; 0.0 elsewhere)
            batch["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float32)
        if "ref_logps" in examples[0]:
            ref = [torch.tensor(ex["ref_logps"], dtype=torch.float32) for ex in examples]
            batch["ref_logps"] = pad_sequence(ref, batch_first=True)
        return batch
