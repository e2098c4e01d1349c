"""What the trainers need to run under a sharding engine (DeepSpeed ZeRO-2/3, FSDP2) as they run under DDP.

- ZeRO-3 and FSDP hold 1/N of every weight per process, so code that *reads* live weights outside a forward (saving a
  role folder, checksums) must see the gathered weights: `full_parameters` (a collective) or, on the one process
  that writes a checkpoint and may not join a collective, `parameters_from_state_dict`.
- ZeRO-1/2/3 keep their own float32 master copy of every trainable weight; a value written into a live parameter
  (the value head's first-rollout bias) is overwritten at the next optimizer step unless the master copy is written
  too: `fill_full_parameter`.
- Some combinations cannot work (a bitsandbytes base under FSDP or ZeRO-3; a shared base under accelerate's FSDP):
  `check_engine_supports` refuses them before training, naming the problem.
- FSDP2 on a shared base in a loop of your own: `fully_shard_shared_base`.

Nothing here imports DeepSpeed unless a parameter was partitioned by it, so DDP and one-process runs need no
DeepSpeed install. docs/distributed.md describes the engines, the configs and what was tested.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


def is_zero3_parameter(param: torch.Tensor) -> bool:
    """Whether `param` is partitioned by DeepSpeed ZeRO-3 (it then carries a `ds_id`, and its `.data` is empty)."""
    return hasattr(param, "ds_id")


def is_dtensor(param: torch.Tensor) -> bool:
    """Whether `param` is an FSDP2 (fully_shard) DTensor: each process holds a shard, `full_tensor()` gathers it."""
    return hasattr(param, "full_tensor")


def engine_name(accelerator) -> str:
    """'deepspeed_zero3', 'deepspeed' (ZeRO-1/2), 'fsdp' or 'ddp' (DDP, or one process) for an accelerate
    Accelerator."""
    state = accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None and accelerator.distributed_type.value == "DEEPSPEED":
        return "deepspeed_zero3" if state.deepspeed_plugin.zero_stage == 3 else "deepspeed"
    if accelerator.distributed_type.value == "FSDP":
        return "fsdp"
    return "ddp"


@contextmanager
def full_parameters(params: Iterable[torch.Tensor] | nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
    """Inside the block every ZeRO-3 partitioned parameter of `params` holds its whole value; a no-op for others.

    A collective: every process must enter it. With `modifier_rank=r`, what process r writes into the parameters
    is kept (and sent to the others) on exit; with None the parameters are read-only. (DDP and ZeRO-1/2 parameters
    are whole already; FSDP2 DTensors are read with `full_tensor()` instead, see `full_tensor`.)
    """
    params = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    partitioned = [p for p in params if is_zero3_parameter(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole value of `param`, detached: an FSDP2 DTensor is gathered (a collective), anything else returned as
    is (call under `full_parameters` for ZeRO-3)."""
    param = param.detach()
    return param.full_tensor() if hasattr(param, "full_tensor") else param


@contextmanager
def parameters_from_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block each sharded parameter of `module` (ZeRO-3 partition or FSDP2 DTensor) that `state_dict`
    holds is replaced by a plain parameter with that whole value; everything is put back on exit.

    For the one process that writes a checkpoint (`Trainer._save` runs on the main process only, so it cannot gather
    with a collective): the Trainer hands it the whole state dict it has already gathered, and code that reads live
    weights through the modules (`SharedBase.save_role`) reads those. Only the modules' parameter slots are swapped,
    locally; nothing is communicated and the shards are not touched. Whole parameters are left alone.
    """
    swapped = []
    try:
        for name, param in list(module.named_parameters()):
            if (is_zero3_parameter(param) or is_dtensor(param)) and name in state_dict:
                owner_name, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                whole = state_dict[name]
                whole = whole.full_tensor() if is_dtensor(whole) else whole
                swapped.append((owner, attr, param))
                owner._parameters[attr] = nn.Parameter(whole.detach(), requires_grad=param.requires_grad)
        yield
    finally:
        for owner, attr, param in swapped:
            owner._parameters[attr] = param


@contextmanager
def whole_weights_on_main_process(accelerator, model: nn.Module) -> Iterator[None]:
    """Inside the block the main process's `model` (unwrapped) reads whole weights, under any engine.

    A collective: every process must enter it. ZeRO-3 gathers the trainable parameters (`full_parameters`); FSDP
    gathers a full state dict (`accelerator.get_state_dict`) and swaps it in on the main process
    (`parameters_from_state_dict`); DDP and ZeRO-1/2 weights are whole already. For final saves that write role
    folders from live modules (the reward trainer's adapter + head folder, the PPO recipe's policy folder).
    """
    unwrapped = accelerator.unwrap_model(model)
    if engine_name(accelerator) == "fsdp":
        state = accelerator.get_state_dict(model)
        with parameters_from_state_dict(unwrapped, state if accelerator.is_main_process else {}):
            yield
        return
    with full_parameters([p for p in unwrapped.parameters() if p.requires_grad]):
        yield


def fill_full_parameter(param: nn.Parameter, value: float) -> None:
    """Fill every element of `param` with `value` so that it survives the next optimizer step under any engine.

    Every process must call it with the same value. Under DeepSpeed the optimizer's float32 master copy is written
    too (`deepspeed.utils.safe_set_full_fp32_param`, after the engine has started); without that, ZeRO-1/2/3 would
    copy the old master value back into the parameter after the next step. A ZeRO-3 parameter is gathered, filled
    and re-partitioned; an FSDP2 DTensor fills its own shard; a plain tensor is filled in place.
    """
    if getattr(param, "_z3_optimizer", None) is not None:
        _write_zero3_master(param, float(value))
    elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, torch.full(param.shape, float(value), dtype=torch.float32, device=param.device))
    with full_parameters([param], modifier_rank=0), torch.no_grad():
        param.fill_(value)


def _write_zero3_master(param: nn.Parameter, value: float) -> None:
    """Fill this process's slice of a ZeRO-3 parameter's float32 master copy with `value`.

    DeepSpeed 0.19.8's `safe_set_full_fp32_param` slices the full value at `partition_size * rank`, which runs past
    the end on a process whose slice is only padding (a parameter with fewer elements than processes, such as a
    value head's one bias: "start (1) + length (1) exceeds dimension size (1)"). Filling the slice needs no slicing.
    """
    optimizer = param._z3_optimizer
    partition, group = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    partition.data.fill_(value)  # the padding past the parameter's end is never read back into it
    if optimizer._swappable_optimizer_subgroup(group):
        optimizer._optimizer_states_and_gradient_swap_out(group)


def is_quantized_model(model: nn.Module) -> bool:
    """Whether `model` (or the base inside a peft model) holds bitsandbytes 4-bit or 8-bit weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def check_engine_supports(model: nn.Module, accelerator, trainer_name: str, shared_base: bool = False) -> None:
    """ValueError before training for what the engine accelerate was launched with cannot do.

    - A bitsandbytes 4-bit or 8-bit base under FSDP or ZeRO-3: both partition every weight, and a packed quantized
      weight (with its quantization state beside it) is not a tensor they can split and gather. ZeRO-2 and DDP
      leave the frozen base whole on every process and train only the adapters, so a quantized base works there.
    - A shared base (`shared_base=True`: PPO or online K-way DPO on a `SharedBase`) under accelerate's FSDP: FSDP2
      gathers weights in the forward hooks of the units accelerate wraps (each decoder layer and the root model),
      but the value and reward roles run the decoder body and their heads without the root's forward, so their
      embedding, final norm and head weights could be read while sharded. `fully_shard_shared_base` wraps those
      modules as units (tested on CPU); the trainers' accelerate FSDP path does not, so it is refused.
    """
    engine = engine_name(accelerator)
    if engine in ("fsdp", "deepspeed_zero3") and is_quantized_model(model):
        label = "FSDP" if engine == "fsdp" else "DeepSpeed ZeRO-3"
        raise ValueError(
            f"{trainer_name}: the base is quantized (bitsandbytes 4-bit/8-bit, --load_in_4bit) and the run was "
            f"launched with {label}, which shards every weight; bitsandbytes weights cannot be sharded this way. "
            "Launch with recipes/accelerate_configs/ddp.yaml or deepspeed_zero2.yaml (the quantized base is small "
            "enough to sit whole on each GPU), or drop --load_in_4bit and use ZeRO-3 on the bf16 base."
        )
    if engine == "fsdp" and shared_base:
        raise ValueError(
            f"{trainer_name} on a SharedBase does not run under accelerate's FSDP: the value and reward roles run the "
            "decoder body and the scalar heads outside the root model's forward, where FSDP would leave their weights "
            "sharded. Launch with recipes/accelerate_configs/deepspeed_zero3.yaml (shards the base the same way, "
            "tested), or shard it yourself with rlhf_ext.distributed.fully_shard_shared_base in your own loop."
        )


def fully_shard_shared_base(shared, mesh=None, reshard_after_forward: bool = True):
    """Shard a `SharedBase` with FSDP2 (`torch.distributed.fsdp.fully_shard`) for a training loop of your own.

    FSDP2 gathers a unit's weights in that unit's forward hook, so every module the shared base calls on its own
    needs to be a unit: each decoder layer, the decoder body (embeddings and final norm: the value and reward roles
    run the body without the LM head), each scalar head (they sit outside peft) and, as the root, the peft model
    (the LM head, for the policy and reference forwards). Wrapping only the layers and the root, as a generic auto
    wrap policy does, would leave the body's weights sharded when the value role runs.

    The trainable set is re-pointed at the sharded parameters (fully_shard replaces every parameter with a DTensor),
    so build the optimizer from `shared.trainable_parameters()` afterwards. Returns `shared`.
    """
    from torch.distributed.fsdp import fully_shard

    if is_quantized_model(shared.peft_model):
        raise ValueError(
            "fully_shard_shared_base: the base is quantized (bitsandbytes); FSDP cannot shard bitsandbytes weights. "
            "Use DDP or DeepSpeed ZeRO-2, or a bf16 base."
        )
    body = shared.peft_model.get_base_model().base_model  # the decoder without the LM head (LlamaModel, ...)
    for layer in body.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(body, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for head in shared.heads.values():
        fully_shard(head, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(shared.peft_model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    _repoint_trainable(shared)
    # FSDP2 picks its root at the first forward and refuses a root forward after a sub-unit ran alone ("FSDP requires
    # running forward through the root module first"); the value and reward roles run the body alone, so one token
    # through the peft model fixes the root before any role runs.
    with torch.no_grad():
        shared.reference_logits(torch.zeros(1, 1, dtype=torch.long, device=shared.device))
    return shared


def _repoint_trainable(shared) -> None:
    """Point the shared base's trainable set (role -> {name: parameter}) at the module's current parameters by name.

    The set is what `trainable_parameters()` returns and what every role switch restores; it holds parameter
    objects, which fully_shard has just replaced. Roles frozen before (`freeze_role`) stay frozen: only the names
    already in the set are looked up.
    """
    current = dict(shared.peft_model.named_parameters())
    current.update({f"heads.{n}": p for n, p in shared.heads.named_parameters()})
    shared._trainable = {role: {name: current[name] for name in params} for role, params in shared._trainable.items()}
    shared._activate(shared.peft_model.active_adapter)
