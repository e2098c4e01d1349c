"""The engine checks and helpers of rlhf_ext.distributed that need no second process (and no DeepSpeed install):
what each engine refuses before training, and the state-dict swap PPOTrainer._save relies on under ZeRO-3/FSDP2."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from rlhf_ext.distributed import (
    check_engine_supports,
    engine_name,
    fill_full_parameter,
    full_parameters,
    parameters_from_state_dict,
    whole_weights_on_main_process,
)
from rlhf_ext.models import SharedBase, SharedBaseArguments, load_base_model, load_head
from rlhf_ext.testing import save_tiny_model, tiny_causal_lm

ARGS = SharedBaseArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0)


def accelerator(distributed_type: DistributedType, zero_stage: int | None = None):
    """What `engine_name` reads of an accelerate Accelerator launched with that engine."""
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(deepspeed_plugin=plugin))


ENGINES = {
    "ddp": accelerator(DistributedType.MULTI_GPU),
    "deepspeed": accelerator(DistributedType.DEEPSPEED, zero_stage=2),
    "deepspeed_zero3": accelerator(DistributedType.DEEPSPEED, zero_stage=3),
    "fsdp": accelerator(DistributedType.FSDP),
}


@pytest.mark.parametrize("name", ENGINES)
def test_engine_name(name):
    assert engine_name(ENGINES[name]) == name


@pytest.fixture(scope="module")
def quantized_shared(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("base"), seed=0, hidden_size=64)  # 4-bit blocks of 64
    return SharedBase(load_base_model(dataclasses.replace(ARGS, load_in_4bit=True, model_name_or_path=path)), ARGS)


@pytest.mark.parametrize("engine, label", [("deepspeed_zero3", "DeepSpeed ZeRO-3"), ("fsdp", "FSDP")])
def test_a_quantized_base_is_refused_where_every_weight_is_sharded(quantized_shared, engine, label):
    with pytest.raises(ValueError, match=f"quantized .* launched with {label}.*deepspeed_zero2.yaml"):
        check_engine_supports(quantized_shared.peft_model, ENGINES[engine], "PPOTrainer")


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_a_quantized_base_is_accepted_where_the_base_stays_whole(quantized_shared, engine):
    check_engine_supports(quantized_shared.peft_model, ENGINES[engine], "PPOTrainer", shared_base=True)


def test_a_shared_base_is_refused_under_accelerate_fsdp_and_accepted_under_zero3():
    shared = SharedBase(tiny_causal_lm(seed=0), ARGS)
    with pytest.raises(ValueError, match="SharedBase does not run under accelerate's FSDP.*deepspeed_zero3.yaml"):
        check_engine_supports(shared.peft_model, ENGINES["fsdp"], "PPOTrainer", shared_base=True)
    check_engine_supports(shared.peft_model, ENGINES["deepspeed_zero3"], "PPOTrainer", shared_base=True)
    check_engine_supports(shared.peft_model, ENGINES["fsdp"], "PlackettLuceDPOTrainer")  # a plain peft model


def test_full_parameters_and_fill_are_plain_on_whole_parameters():
    param = torch.nn.Parameter(torch.zeros(3))
    with full_parameters([param]):  # no ZeRO-3 parameter: nothing to gather
        assert param.shape == (3,)
    fill_full_parameter(param, 2.5)
    assert torch.equal(param.detach(), torch.full((3,), 2.5))


def test_parameters_from_state_dict_lets_save_role_write_the_gathered_values(tmp_path):
    """Under ZeRO-3 each live parameter is an empty partition (here: a fake one, carrying a `ds_id` and no data);
    `save_role` inside the swap writes the whole values of the state dict and the live parameters come back."""
    shared = SharedBase(tiny_causal_lm(seed=0), ARGS)
    state = {name: torch.randn(p.shape) for name, p in shared.named_parameters()}
    partitioned = {}
    for name, param in shared.named_parameters():
        if name.startswith("heads.value") or (".lora_" in name and ".value." in name):
            param.data = torch.empty(0)  # what ZeRO-3 leaves in a partitioned parameter
            param.ds_id = len(partitioned)
            partitioned[name] = param
    with parameters_from_state_dict(shared, state):
        shared.save_role("value", tmp_path / "value")
    assert all(p is dict(shared.named_parameters())[n] and p.numel() == 0 for n, p in partitioned.items())
    head = load_head(tmp_path / "value")
    torch.testing.assert_close(head.linear.weight, state["heads.value.linear.weight"], rtol=0, atol=0)
    loaded = SharedBase(tiny_causal_lm(seed=0), dataclasses.replace(ARGS, value_adapter_path=str(tmp_path / "value")))
    for name, param in loaded.peft_model.named_parameters():
        if ".lora_" in name and ".value." in name:
            torch.testing.assert_close(param.detach(), state[f"peft_model.{name}"], rtol=0, atol=0)


def test_whole_weights_on_main_process_swaps_in_the_full_state_dict_under_fsdp(tmp_path):
    """Under FSDP each parameter is a DTensor shard (here: a fake one, empty with a `full_tensor`); the final saves
    read the full state dict accelerate gathers, and the shards come back afterwards."""
    shared = SharedBase(tiny_causal_lm(seed=0), ARGS)
    state = {name: torch.randn(p.shape) for name, p in shared.named_parameters()}
    sharded = {}
    for name, param in shared.named_parameters():
        if name.startswith("heads.value") or (".lora_" in name and ".value." in name):
            param.data = torch.empty(0)
            param.full_tensor = lambda: (_ for _ in ()).throw(AssertionError("gathered on the main process alone"))
            sharded[name] = param
    fsdp = SimpleNamespace(
        distributed_type=DistributedType.FSDP, state=SimpleNamespace(deepspeed_plugin=None), is_main_process=True,
        unwrap_model=lambda model: model, get_state_dict=lambda model: state,
    )  # fmt: skip
    with whole_weights_on_main_process(fsdp, shared):
        shared.save_role("value", tmp_path / "value")
    assert all(dict(shared.named_parameters())[n] is p and p.numel() == 0 for n, p in sharded.items())
    torch.testing.assert_close(
        load_head(tmp_path / "value").linear.weight, state["heads.value.linear.weight"], rtol=0, atol=0
    )
