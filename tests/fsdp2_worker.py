"""A PPO-shaped training loop on a FSDP2-sharded `SharedBase`, for tests/test_distributed.py.

accelerate turns FSDP on only for GPU-like devices, so on CPU the shared base is sharded directly
(`rlhf_ext.distributed.fully_shard_shared_base`, gloo, a CPU device mesh) under torchrun; run without torchrun the
same loop trains the unsharded model on the whole batch, the reference run. Every step switches roles as PPO does:
policy and value forwards with grad, reference (adapters off) and reward forwards without, one backward reaching
the policy adapter, the value adapter and the value head.

Writes `weights.safetensors` (every trainable weight, whole) and the policy and value role folders (saved by the
main process from a gathered state dict, as PPOTrainer._save does) to `--output_dir`, and prints `RLHF_EXT_OK {json}`
with every process's checksums. It imports rlhf_ext from the repository root, which tests/test_distributed.py puts on
its PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import zlib

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from rlhf_ext.distributed import full_tensor, fully_shard_shared_base, parameters_from_state_dict
from rlhf_ext.models import SharedBase, SharedBaseArguments

MARKER = "RLHF_EXT_OK"
VOCAB, SEQ, GLOBAL_BATCH = 101, 10, 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--reward_adapter", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    return parser.parse_args()


def deterministic_trainables(shared: SharedBase) -> None:
    """Trainable weights that depend only on their names, as in tests/distributed_worker.py."""
    with torch.no_grad():
        for role in ("policy", "value"):
            for name, param in shared._trainable[role].items():
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) [B, T-1]."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def step_loss(shared: SharedBase, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A PPO-shaped loss: score-weighted log-likelihood, a KL term to the reference, a value regression."""
    with torch.no_grad():
        scores = shared.reward_scores(ids, mask)  # frozen reward adapter + head
        ref = token_logprobs(shared.reference_logits(ids, mask), ids)  # every adapter off
    logp = token_logprobs(shared.policy_logits(ids, mask), ids)  # policy adapter, with grad
    values = shared.values(ids, mask)  # value adapter + head, with grad
    policy = -(scores[:, None] * logp).mean() + 0.1 * (logp - ref).pow(2).mean()
    return policy + 0.5 * (values - scores[:, None]).pow(2).mean()


def main() -> None:
    cli = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    shared = SharedBase.from_pretrained(
        cli.base,
        SharedBaseArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
                            reward_adapter_path=cli.reward_adapter),
    )  # fmt: skip
    deterministic_trainables(shared)
    for module in shared.modules():  # the reward adapter may carry LoRA dropout; the runs must be deterministic
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if cli.gradient_checkpointing:
        shared.enable_gradient_checkpointing()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        fully_shard_shared_base(shared, init_device_mesh("cpu", (world,)))
    shared.train()
    optimizer = torch.optim.AdamW(shared.trainable_parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for _ in range(cli.steps):
        ids = torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ), generator=data)
        mask = torch.ones_like(ids)
        loss = step_loss(shared, ids[local], mask[local])
        loss.backward()  # FSDP2 reduce-scatters the mean of the processes' gradients: the global batch's mean
        optimizer.step()
        optimizer.zero_grad()

    # every process takes part in gathering; only the main process writes, from the gathered values
    state = {name: full_tensor(p).float().cpu().clone() for name, p in shared.named_parameters()}
    trainable = {f"{role}:{name}": full_tensor(p).float().cpu().clone()
                 for role in ("policy", "value") for name, p in shared._trainable[role].items()}  # fmt: skip
    checksum = [float(trainable[k].double().sum()) for k in sorted(trainable)]
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, checksum)
    else:
        gathered = [checksum]
    if rank == 0:
        os.makedirs(cli.output_dir, exist_ok=True)
        save_file(trainable, os.path.join(cli.output_dir, "weights.safetensors"))
        with parameters_from_state_dict(shared, state):
            shared.save_role("policy", os.path.join(cli.output_dir, "policy"))
            shared.save_role("value", os.path.join(cli.output_dir, "value"))
        sharded = any(hasattr(p, "full_tensor") for p in shared.parameters())
        print(MARKER, json.dumps({"processes": world, "sharded": sharded, "checksums": gathered}), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
