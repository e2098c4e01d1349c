"""Each prompt computed once: the shared-prompt layout of a K-way batch (indices, positions, masks; torch only).

A K-way batch holds B lists, list b a prompt p (P_b tokens) and K_b completions c_k (R_k tokens). The collator lays
it out as N = sum_b K_b right-padded rows `[p | c_k]`, so a forward pass computes each prompt K_b times:
sum_b K_b (P_b + max R) tokens. The shared layout gives each list one block

    [ p_0 .. p_{P-2} | p_{P-1} c_1 | p_{P-1} c_2 | ... | p_{P-1} c_K ]          P - 1 + sum_k (1 + R_k) tokens

in which
  * a token of the prompt part attends causally to the prompt part;
  * a token of segment k (`p_{P-1} c_k`) attends to the prompt part and causally within segment k, never to
    another segment;
  * a token's position id is its column in the unshared row `[p | c_k]`: the prompt part 0..P-2, segment k
    P-1 .. P-1+R_k, so every completion starts at position P.

Exactness. Each segment repeats the prompt's last token p_{P-1}, at position P-1. Its query meets, at every layer,
the keys and values of p_0..p_{P-2} (the same tensors in every segment: they depend on the prompt alone) and its own,
so by induction over the layers its hidden state is the prompt's last hidden state h_{P-1}. Likewise the token of c_k
at position t sees exactly p_0..p_{P-1}, c_k[..t] at the positions it has in `[p | c_k]`: every hidden state of
segment k equals the unshared row's at the same position, and

    log pi(c_k[0] | p) is read at segment k's first token, log pi(c_k[i] | p, c_k[<i]) at its (i+1)-th,

one label per position. (The alternative, one copy of p_{P-1} whose hidden state K labels are read from, needs a
gather with repeats outside the model's forward; repeating the token costs K - 1 tokens per list and lets the forward,
with its fused LM head, run unchanged.) A reward model's score of c_k is read at segment k's last token, the unshared
row's last real token.

Packing puts several lists' blocks side by side in one row, a token attending only within its block (positions restart
with each block): less padding, at the cost of a dense mask over the packed row. `rows_by_cost` chooses how many rows
by a cost model in which one row per list is always a candidate (docs/kway.md, "Each prompt computed once").

Everything here is an index computed from the unshared batch: the shared row is a gather of it, so it holds only
tokens of the batch at positions they had there, and per-token results scatter back to the unshared shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class SharedPromptLayout:
    """Where each token of the shared rows comes from in the unshared batch [N, T] (see the module docstring).

    source_sequence  long [R, L]  the unshared row n the token is read from; -1 on padding
    source_position  long [R, L]  its column t there, which is also its position id; 0 on padding
    segment          long [R, L]  0 prompt part, k + 1 completion k of its list; -1 on padding
    block            long [R, L]  the list's index b in the batch; -1 on padding
    last_token       long [N, 2]  (row, column) of sequence n's last token in the shared rows (its segment's end)
    width            int          T, the unshared rows' width
    """

    source_sequence: torch.Tensor
    source_position: torch.Tensor
    segment: torch.Tensor
    block: torch.Tensor
    last_token: torch.Tensor
    width: int

    @property
    def is_token(self) -> torch.Tensor:
        """bool [R, L]: True on a token, False on padding."""
        return self.source_sequence >= 0

    @property
    def num_tokens(self) -> int:
        """Tokens the shared rows hold (padding excluded): sum_b (P_b - 1 + sum_k (1 + R_{b,k}))."""
        return int(self.is_token.sum())


def prompt_and_sequence_lengths(attention_mask: torch.Tensor,
                                completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_n, P_n + R_n), long [N] each: prompt length and real length of each unshared row.

    R_n = sum_t completion_mask[n, t] and P_n + R_n = sum_t attention_mask[n, t].
    """
    lengths = attention_mask.long().sum(dim=1)
    return lengths - completion_mask.long().sum(dim=1), lengths


def layout_problem(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                   num_completions: torch.Tensor) -> str | None:
    """Why this unshared batch cannot be laid out with shared prompts, or None when it can.

    It can when each row is right padded as `[prompt | completion | padding]` (attention_mask 1 on the first P_n + R_n
    columns, completion_mask 1 on columns P_n .. P_n + R_n - 1) and the K_b rows of each list hold the same prompt
    tokens: same P, same ids. The K-way collator writes exactly that; the check is what makes a shared forward exact
    for any batch, a collator of the user's included.
    """
    prompt_lengths, lengths = prompt_and_sequence_lengths(attention_mask, completion_mask)
    if (lengths == 0).any():
        return f"sequence {int((lengths == 0).nonzero()[0])} of the batch has no token"
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    real = columns < lengths[:, None]
    completion = real & (columns >= prompt_lengths[:, None])
    bad = ((attention_mask.bool() != real) | (completion_mask.bool() != completion)).any(dim=1)
    if bad.any():
        return (f"sequence {int(bad.nonzero()[0])} of the batch is not laid out as right-padded "
                "[prompt | completion] (attention_mask and completion_mask do not mark a prompt then a completion)")
    sizes = num_completions.tolist()
    if sum(sizes) != input_ids.shape[0]:
        return f"num_completions sums to {sum(sizes)}, but the batch holds {input_ids.shape[0]} sequences"
    first = torch.repeat_interleave(torch.cumsum(num_completions, 0) - num_completions, num_completions)
    same_length = prompt_lengths == prompt_lengths[first]
    in_prompt = columns < prompt_lengths[:, None]
    same_ids = ((input_ids == input_ids[first]) | ~in_prompt).all(dim=1)
    differs = ~(same_length & same_ids)
    if differs.any():
        n = int(differs.nonzero()[0])
        b = int(torch.searchsorted(torch.cumsum(num_completions, 0), n, right=True))
        return (f"list {b} of the batch: its completions do not share an identical prompt token prefix "
                f"(sequence {n} has other prompt tokens than the list's first)")
    return None


def block_lengths(attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                  num_completions: torch.Tensor) -> list[int]:
    """Tokens of each list's block: L_b = max(P_b - 1, 0) + sum_k (P_b + R_{b,k} - max(P_b - 1, 0))."""
    prompt_lengths, lengths = prompt_and_sequence_lengths(attention_mask, completion_mask)
    first = torch.cumsum(num_completions, 0) - num_completions
    shared = (prompt_lengths[first] - 1).clamp(min=0)
    per_sequence = lengths - torch.repeat_interleave(shared, num_completions)
    totals = torch.zeros_like(shared).index_add_(0, torch.repeat_interleave(
        torch.arange(len(num_completions), device=shared.device), num_completions), per_sequence)
    return (shared + totals).tolist()


def rows_by_cost(lengths: list[int], attention_span: float) -> list[list[int]]:
    """Which lists share a row: the grouping with the least modelled cost among r = 1 .. B rows,

        cost(r) = r * W_r * (1 + W_r / attention_span)        W_r: the width of the r rows (their fullest fill)

    each filled longest block first, each block into the emptiest row (so r = B is one row per list, and nothing is
    chosen that the model says costs more). A row of width W costs W positions of linear layers plus, with a dense
    mask, W^2 query-key pairs; `attention_span` is the width at which the two are equal (`attention_span` of
    `rlhf_ext.models.shared_prompt`). Returns the list indices of each row.
    """
    order = sorted(range(len(lengths)), key=lambda b: -lengths[b])
    best, best_cost = [[b] for b in range(len(lengths))], math.inf
    for r in range(1, len(lengths) + 1):
        rows, fills = [[] for _ in range(r)], [0] * r
        for b in order:
            emptiest = min(range(r), key=fills.__getitem__)
            rows[emptiest].append(b)
            fills[emptiest] += lengths[b]
        width = max(fills)
        cost = r * width * (1 + width / attention_span)
        if cost < best_cost:
            best, best_cost = [sorted(row) for row in rows], cost
    return best


def shared_prompt_layout(attention_mask: torch.Tensor, completion_mask: torch.Tensor, num_completions: torch.Tensor,
                         *, rows: list[list[int]] | None = None,
                         pad_to_multiple_of: int | None = None) -> SharedPromptLayout:
    """The shared-prompt layout of an unshared K-way batch (checked by `layout_problem` first).

    Block b, for list b with prompt length P and sequences n_1..n_K (n_1 = its first row), reads

        prompt part  (n_1, t) for t = 0 .. P-2                      segment 0
        segment k    (n_k, t) for t = max(P-1, 0) .. P + R_k - 1     segment k      (k = 1..K)

    With P = 0 there is no prompt token to repeat: a segment starts with its completion, whose first token, as in the
    unshared row, has no predecessor to be read from. `rows`: the lists of each row (`rows_by_cost`; [[0, .., B-1]]
    packs all in one row); None is one row per list. Rows are padded to the widest.
    """
    prompt_lengths, lengths = prompt_and_sequence_lengths(attention_mask, completion_mask)
    device = attention_mask.device
    prompt_lengths, lengths, sizes = prompt_lengths.tolist(), lengths.tolist(), num_completions.tolist()
    blocks, ends = [], []  # per block (sequence, position, segment) index tensors; per sequence (block, end offset)
    first = 0
    for b, size in enumerate(sizes):
        prompt_length = prompt_lengths[first]
        repeat_from = max(prompt_length - 1, 0)  # the column every segment starts at (p_{P-1}, or c_k[0] when P = 0)
        pieces = [(first, 0, repeat_from, 0)]
        for k in range(size):
            pieces.append((first + k, repeat_from, lengths[first + k], k + 1))
        sequence = torch.cat([torch.full((stop - start,), n, dtype=torch.long) for n, start, stop, _ in pieces])
        position = torch.cat([torch.arange(start, stop, dtype=torch.long) for _, start, stop, _ in pieces])
        segment = torch.cat([torch.full((stop - start,), s, dtype=torch.long) for _, start, stop, s in pieces])
        offset = 0
        for _, start, stop, s in pieces:
            offset += stop - start
            if s > 0:
                ends.append((b, offset - 1))
        blocks.append((sequence, position, segment))
        first += size
    row_lists = [[b] for b in range(len(blocks))] if rows is None else rows
    if sorted(b for row in row_lists for b in row) != list(range(len(blocks))):
        raise ValueError(f"rows {row_lists} must hold each of the {len(blocks)} lists once")
    rows = [[blocks[b] for b in row] for row in row_lists]
    width = max(sum(len(seq) for seq, _, _ in row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), width)
    source_sequence = torch.full(shape, -1, dtype=torch.long)
    source_position = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    block_ids = torch.full(shape, -1, dtype=torch.long)
    block_row, block_start = {}, {}
    for r, (row, members) in enumerate(zip(rows, row_lists)):
        column = 0
        for b, (sequence, position, segment) in zip(members, row):
            span = slice(column, column + len(sequence))
            source_sequence[r, span], source_position[r, span], segment_ids[r, span] = sequence, position, segment
            block_ids[r, span] = b
            block_row[b], block_start[b] = r, column
            column += len(sequence)
    last_token = torch.tensor([(block_row[b], block_start[b] + end) for b, end in ends], dtype=torch.long)
    return SharedPromptLayout(
        source_sequence=source_sequence.to(device), source_position=source_position.to(device),
        segment=segment_ids.to(device), block=block_ids.to(device), last_token=last_token.reshape(-1, 2).to(device),
        width=attention_mask.shape[1],
    )


def gather_shared(values: torch.Tensor, layout: SharedPromptLayout, fill=0) -> torch.Tensor:
    """shared[r, l] = values[source_sequence[r, l], source_position[r, l]], `fill` on padding; [N, T, ...] ->
    [R, L, ...].

    With `values = input_ids` this is the shared rows' input ids; with the unshared next-token labels
    (`next_token_labels`), their labels.
    """
    picked = values[layout.source_sequence.clamp(min=0), layout.source_position]
    pad = ~layout.is_token
    return picked.masked_fill(pad.view(*pad.shape, *([1] * (picked.dim() - 2))), fill)


def next_token_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """labels[n, t] = input_ids[n, t + 1] where token t + 1 is a completion token, else -100. long [N, T].

    The label each position predicts (the unshared forward shifts labels the same way); the last column has none.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, IGNORE_INDEX)
    return labels


def attention_allowed(layout: SharedPromptLayout) -> torch.Tensor:
    """allowed[r, 0, q, j]: may token q of row r attend to token j? bool [R, 1, L, L].

        allowed = same block & j <= q & (segment_j = 0 or segment_j = segment_q)

    (j <= q in row order is causal order: a block's prompt part comes before its segments, a segment's tokens are in
    their order.) A padding query attends to itself only, so that no softmax row is empty (an all-masked row gives NaN
    in some attention kernels); no real token attends to padding.
    """
    block, segment = layout.block, layout.segment
    columns = torch.arange(block.shape[1], device=block.device)
    causal = columns[None, :, None] >= columns[None, None, :]
    same_block = (block[:, :, None] == block[:, None, :]) & (block[:, None, :] >= 0)
    shared_or_own = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
    padding_self = (~layout.is_token)[:, :, None] & torch.eye(block.shape[1], dtype=torch.bool, device=block.device)
    return ((same_block & shared_or_own & causal) | padding_self).unsqueeze(1)


def scatter_to_unshared(values: torch.Tensor, layout: SharedPromptLayout, labels: torch.Tensor) -> torch.Tensor:
    """Per-token values of the shared rows [R, L] back to the unshared next-token layout [N, T - 1].

    out[n, t] = the value at the shared token read from (n, t), for every token with a label (labels != -100 [R, L]);
    0 elsewhere, as the fused LM head gives where the label is -100. Each labelled (n, t) occurs once in the shared
    rows (the prompt part, shared by K rows, has no label), so this is a bijection on labelled tokens.
    """
    labelled = labels != IGNORE_INDEX
    n, t = layout.source_sequence[labelled], layout.source_position[labelled]
    out = values.new_zeros(int(layout.last_token.shape[0]), layout.width - 1)
    return out.index_put((n, t), values[labelled])


def read_last_tokens(per_token: torch.Tensor, layout: SharedPromptLayout) -> torch.Tensor:
    """per_token [R, L, ...] read at each sequence's last token -> [N, ...] (sequence order of the unshared batch)."""
    return per_token[layout.last_token[:, 0], layout.last_token[:, 1]]


# ------------------------------------------------------------------ GRPO's groups: left-padded prompts


def grouped_rows_problem(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> str | None:
    """Why GRPO-style rows `[padding | prompt | completion | padding]` (prompt_mask [N, P_w] left padded,
    completion_mask [N, C] right padded) cannot be read as prompt + completion, or None when they can.

    They can when each prompt mask is 0 then 1 (at least one 1: a completion's first token is predicted from the
    prompt's last one, which an empty prompt lacks; unshared, it would be read at a padding column) and each completion
    mask 1 then 0. GRPOTrainer pads exactly so; the check makes the shared forward exact for any rollout.
    """
    prompt_lengths, completion_lengths = prompt_mask.long().sum(dim=1), completion_mask.long().sum(dim=1)
    prompt_columns = torch.arange(prompt_mask.shape[1], device=prompt_mask.device)
    left_padded = prompt_mask.bool() == (prompt_columns >= prompt_mask.shape[1] - prompt_lengths[:, None])
    bad = ~left_padded.all(dim=1)
    if bad.any():
        return f"sequence {int(bad.nonzero()[0])} of the batch: its prompt mask is not left padding then the prompt"
    if (prompt_lengths == 0).any():
        return f"sequence {int((prompt_lengths == 0).nonzero()[0])} of the batch has an empty prompt"
    completion_columns = torch.arange(completion_mask.shape[1], device=completion_mask.device)
    right_padded = completion_mask.bool() == (completion_columns < completion_lengths[:, None])
    bad = ~right_padded.all(dim=1)
    if bad.any():
        return (f"sequence {int(bad.nonzero()[0])} of the batch: its completion mask is not the completion then "
                "right padding")
    return None


def right_padded_rows(input_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """GRPO-style rows `[padding | prompt | completion | padding]` [N, T] (input_ids = prompt_ids then completion_ids;
    masks as `grouped_rows_problem` accepts) as the right-padded rows `[prompt | completion | padding]` the layout
    reads: each row shifted left by its z_n padding columns.

    Returns input_ids, attention_mask, completion_mask [N, T] and position_ids [N, T]: position_ids[n, t] = t + z_n,
    the column the token has in the unshared row, which is its position there (transformers numbers a row's columns,
    padding included, when it is given no position ids, as GRPOTrainer's forward is not).
    """
    num_rows, width = input_ids.shape
    prompt_width = prompt_mask.shape[1]
    shift = prompt_width - prompt_mask.long().sum(dim=1)  # z_n, the left padding of row n
    source = torch.arange(width, device=input_ids.device)[None, :] + shift[:, None]
    inside = source < width
    source = source.clamp(max=width - 1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1).long()
    completion = torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1).long()
    return {
        "input_ids": input_ids.gather(1, source).masked_fill(~inside, 0),
        "attention_mask": attention.gather(1, source).masked_fill(~inside, 0),
        "completion_mask": completion.gather(1, source).masked_fill(~inside, 0),
        "position_ids": source.masked_fill(~inside, 0),
    }


def completion_columns(per_token: torch.Tensor, prompt_lengths: torch.Tensor, completion_length: int) -> torch.Tensor:
    """Per-token values of right-padded rows in the next-token layout [N, T - 1] (column t predicts token t + 1) read
    at each row's completion: out[n, j] = per_token[n, P_n - 1 + j], the prediction of completion token j, for
    j < C = completion_length. [N, C]: the columns GRPOTrainer keeps (`[:, -logits_to_keep:]` of its unshared rows)."""
    columns = prompt_lengths[:, None] - 1 + torch.arange(completion_length, device=per_token.device)[None, :]
    return per_token.gather(1, columns.clamp(0, per_token.shape[1] - 1))


def rows_by_prompt(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that hold the same prompt, wherever they sit in the batch: (order long [N], sizes long [G]).

    Two rows hold the same prompt when their prompt masks and the ids under them are equal. `order` lists the rows
    group by group (the groups in the order of their first row, each group's rows in batch order: a batch already in
    groups, GRPO's rollout, keeps its order) and sizes[g] counts group g's rows. PPO's micro-batches are shuffled
    completions, so a group's rows are scattered; gathered, they share one prompt computation.
    """
    key = torch.cat([prompt_mask.long(), prompt_ids.long().masked_fill(prompt_mask == 0, -1)], dim=1)
    _, group = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(len(group), device=group.device)
    first_row = torch.full((int(group.max()) + 1,), len(group), device=group.device).scatter_reduce(
        0, group, rows, reduce="amin")
    order = torch.sort(first_row[group], stable=True).indices
    _, sizes = torch.unique_consecutive(first_row[group][order], return_counts=True)
    return order, sizes
