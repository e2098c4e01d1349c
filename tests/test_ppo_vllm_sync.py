"""What PPOTrainer sends to vLLM on a weight sync with a SharedBase, checked on CPU without vLLM.

vLLM is not installed here (it needs a GPU), and TRL's `VLLMGeneration._init_vllm` raises without it. The tests
replace that one method with one that installs a recorder where the engine would be: it exposes what TRL's
`sync_weights` calls, `vllm_client.update_named_params` (server mode) and
`llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights` (colocate mode). Everything else is
the real code: GRPOTrainer builds its `VLLMGeneration` from `use_vllm=True`, PPOTrainer adapts it, and TRL's
`sync_weights` sends. The recorder copies each tensor as it arrives, as the broadcast or the copy into vLLM would.

The expectation is independent of the sync: a fresh copy of the tiny base with only the policy adapter merged into
it (`SharedBase.export_merged_policy`, peft's `merge_and_unload` on a copy), by its `state_dict()` names.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import peft
import peft.tuners.lora.bnb
import pytest
import torch
import trl
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit
from datasets import Dataset
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM
from trl.distributed import DistributedBackend
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer.grpo_trainer import GRPOTrainer

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.testing import save_tiny_model, tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
MODES = ["server", "colocate"]
# Nothing of these may reach vLLM: the critic attached to the model, the heads, peft's own names, other adapters.
FOREIGN_NAME_PARTS = ("value_model", "heads.", "lora_", "base_layer", "modules_to_save", ".value.", ".reward.")


# ----------------------------------------------------------------------------- the stand-in for vLLM


class RecordingVLLM:
    """Stands in for the vLLM server client and the colocated engine: records the (name, tensor) pairs it gets."""

    def __init__(self):
        self.sent: list[tuple[str, torch.Tensor]] = []
        self.metadata = None
        model = SimpleNamespace(load_weights=self.load_weights)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))
        )

    def update_named_params(self, metadata, named_params):  # VLLMClient.update_named_params (server mode)
        self.metadata = list(metadata)
        self.sent.extend((name, tensor.detach().clone()) for name, tensor in named_params)

    def load_weights(self, weights):  # vLLM's model.load_weights (colocate mode)
        self.sent.extend((name, tensor.detach().clone()) for name, tensor in weights)

    def reset_prefix_cache(self):
        pass

    def get_server_info(self):  # asked once at construction in server mode
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}


def install_recorder_instead_of_vllm(generation: VLLMGeneration) -> None:
    """Replacement for VLLMGeneration._init_vllm: the recorder where TRL keeps its client (server) or LLM (colocate)."""
    recorder = RecordingVLLM()
    generation.vllm_client = recorder
    generation.llm = recorder
    generation._llm_weights_sleeping = False


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setattr(VLLMGeneration, "_init_vllm", install_recorder_instead_of_vllm)


def sent_on_sync(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    """What one `sync_weights` (the call GRPOTrainer makes before generating) sends, by name, in order."""
    recorder = trainer.vllm_generation.vllm_client
    recorder.sent = []
    trainer.vllm_generation.sync_weights()
    names = [name for name, _ in recorder.sent]
    assert len(names) == len(set(names)), f"a name was sent twice: {sorted(n for n in names if names.count(n) > 1)}"
    return dict(recorder.sent)


# ----------------------------------------------------------------------------- models and trainers


def randomize_lora(peft_model, adapter: str, seed: int, scale: float = 0.2) -> None:
    """peft starts lora_B at 0; random weights make an adapter differ from the base (and from the other adapters)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if f".{adapter}." in name and ".lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator).to(param.dtype))


@pytest.fixture
def reward_folder(tmp_path):
    """An adapter + head folder with random weights, loadable as the reward role."""
    donor = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA))
    randomize_lora(donor.peft_model, "value", seed=3)
    return str(save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], tmp_path / "reward", "reward"))


def make_shared(model, args: SharedBaseArguments) -> SharedBase:
    """A shared base whose policy and value adapters are random and different (the reward one comes random)."""
    shared = SharedBase(model, args)
    randomize_lora(shared.peft_model, "policy", seed=1)
    randomize_lora(shared.peft_model, "value", seed=2)
    return shared


def vllm_trainer(shared: SharedBase, tmp_path, mode: str) -> PPOTrainer:
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    args = PPOConfig(
        output_dir=str(tmp_path / "out"),
        use_vllm=True,
        vllm_mode=mode,
        per_device_train_batch_size=4,
        max_completion_length=6,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    dataset = Dataset.from_dict({"prompt": ["abc", "hello", "xy", "qrs"] * 2})
    # the reward role when there is one; the sync does not depend on the reward
    reward = None if "reward" in shared.heads else (lambda completions, **kwargs: [float(len(c)) for c in completions])
    return PPOTrainer(shared, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer)


def merged_policy_state(shared: SharedBase, fresh_base, tmp_path) -> dict[str, torch.Tensor]:
    """state_dict() of `fresh_base` (a copy of the shared base's base) with only the policy adapter merged in."""
    directory = shared.export_merged_policy(tmp_path / "merged", base=fresh_base, dtype=fresh_base.dtype)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=fresh_base.dtype).state_dict()


def assert_sent_is(sent: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tolerance) -> None:
    """Same names, dtypes and values (to `tolerance`) as the expected merged policy, and nothing foreign."""
    foreign = sorted(n for n in sent if any(part in n for part in FOREIGN_NAME_PARTS))
    assert not foreign, f"{len(foreign)} tensors that are not the policy's were sent, e.g. {foreign[:4]}"
    assert set(sent) == set(expected), (
        f"sent but not in the merged policy: {sorted(set(sent) - set(expected))[:4]}; "
        f"in the merged policy but not sent: {sorted(set(expected) - set(sent))[:4]}"
    )
    for name, tensor in expected.items():
        assert sent[name].dtype == tensor.dtype, f"{name}: sent {sent[name].dtype}, merged policy has {tensor.dtype}"
        torch.testing.assert_close(sent[name], tensor, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def live_state(shared: SharedBase) -> dict:
    """Everything a sync must leave as it was: every weight (bits), requires_grad, the active adapter, merges."""
    named = list(shared.peft_model.named_parameters()) + [(f"heads.{n}", p) for n, p in shared.heads.named_parameters()]
    return {
        "weights": {n: p.detach().clone() for n, p in named},
        "requires_grad": {n: p.requires_grad for n, p in named},
        "active_adapter": shared.peft_model.active_adapter,
        "merged": [m.merged_adapters for m in shared.peft_model.modules() if isinstance(m, LoraLayer)],
    }


def assert_live_state_unchanged(shared: SharedBase, before: dict) -> None:
    after = live_state(shared)
    changed = [n for n, w in before["weights"].items() if not torch.equal(w, after["weights"][n])]
    assert not changed, f"{len(changed)} live weights changed, e.g. {changed[:4]}"
    assert after["requires_grad"] == before["requires_grad"], "the trainable set changed"
    assert after["active_adapter"] == before["active_adapter"] == "policy"
    assert after["merged"] == before["merged"] and not any(after["merged"]), "an adapter was left merged"


# ----------------------------------------------------------------------------- what is sent


@pytest.mark.parametrize("mode", MODES)
def test_sync_sends_exactly_the_policy_merged_into_the_base(tmp_path, reward_folder, no_vllm, mode):
    shared = make_shared(tiny_causal_lm(seed=0), SharedBaseArguments(reward_adapter_path=reward_folder, **LORA))
    trainer = vllm_trainer(shared, tmp_path, mode)

    sent = sent_on_sync(trainer)

    expected = merged_policy_state(shared, tiny_causal_lm(seed=0), tmp_path)
    assert_sent_is(sent, expected, rtol=0, atol=1e-6)
    plain_base = tiny_causal_lm(seed=0).state_dict()
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sent[q_proj], plain_base[q_proj], atol=1e-3), "the policy should move the q_proj weight"
    if mode == "server":  # the names, dtypes and shapes announced before the broadcast are those of the tensors
        announced = trainer.vllm_generation.vllm_client.metadata
        assert announced == [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in sent.items()]


def test_sync_sends_the_policy_whichever_role_is_active(tmp_path, reward_folder, no_vllm):
    shared = make_shared(tiny_causal_lm(seed=0), SharedBaseArguments(reward_adapter_path=reward_folder, **LORA))
    trainer = vllm_trainer(shared, tmp_path, "colocate")

    with shared.role("value"):
        sent_under_value = sent_on_sync(trainer)
    with shared.role("reference"):
        sent_under_reference = sent_on_sync(trainer)

    expected = merged_policy_state(shared, tiny_causal_lm(seed=0), tmp_path)
    assert_sent_is(sent_under_value, expected, rtol=0, atol=1e-6)
    assert_sent_is(sent_under_reference, expected, rtol=0, atol=1e-6)


def test_sync_leaves_the_live_model_unchanged(tmp_path, reward_folder, no_vllm):
    shared = make_shared(tiny_causal_lm(seed=0), SharedBaseArguments(reward_adapter_path=reward_folder, **LORA))
    trainer = vllm_trainer(shared, tmp_path, "colocate")
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    shared.eval()
    with torch.no_grad():
        outputs_before = [shared.policy_logits(input_ids), shared.values(input_ids), shared.reference_logits(input_ids)]
        outputs_before.append(shared.reward_scores(input_ids))
    before = live_state(shared)

    for _ in range(3):
        sent_on_sync(trainer)

    assert_live_state_unchanged(shared, before)
    with torch.no_grad():
        outputs_after = [shared.policy_logits(input_ids), shared.values(input_ids), shared.reference_logits(input_ids)]
        outputs_after.append(shared.reward_scores(input_ids))
    for role, b, a in zip(["policy", "value", "reference", "reward"], outputs_before, outputs_after, strict=True):
        assert torch.equal(b, a), f"the {role} outputs changed after the syncs"


def test_sync_on_a_bfloat16_base_keeps_the_base_bit_identical(tmp_path, no_vllm):
    # Merging a float32 adapter into bfloat16 weights and unmerging it again rounds twice: an in-place merge for every
    # sync would move the base, which is also the reference and the body of the value and reward roles.
    shared = make_shared(tiny_causal_lm(seed=0).to(torch.bfloat16), SharedBaseArguments(dtype="bfloat16", **LORA))
    trainer = vllm_trainer(shared, tmp_path, "colocate")
    before = live_state(shared)

    for _ in range(3):
        sent = sent_on_sync(trainer)

    assert_live_state_unchanged(shared, before)
    expected = merged_policy_state(shared, tiny_causal_lm(seed=0).to(torch.bfloat16), tmp_path)
    # peft merges into the bfloat16 copy by adding a rounded delta; the sync rounds once after a float32 sum
    assert_sent_is(sent, expected, rtol=1.6e-2, atol=1e-3)


def dequantized_fp32_base(path: str, quantized) -> torch.nn.Module:
    """The base in float32, holding exactly the weights the 4-bit layers of `quantized` represent."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Linear4bit):
                name = name.replace(".base_layer", "").removeprefix("base_model.model.")
                model.get_submodule(name).weight.copy_(dequantize_4bit(module.weight.data, module.weight.quant_state))
    return model


def test_sync_of_a_4bit_base_sends_the_policy_merged_into_the_dequantized_weights(tmp_path, no_vllm):
    # hidden 64: a multiple of bitsandbytes' 4-bit block size
    path = save_tiny_model(tmp_path / "base", seed=0, hidden_size=64)
    args = SharedBaseArguments(load_in_4bit=True, **LORA)
    shared = SharedBase.from_pretrained(path, args)
    randomize_lora(shared.peft_model, "policy", seed=1)
    randomize_lora(shared.peft_model, "value", seed=2)
    trainer = vllm_trainer(shared, tmp_path, "colocate")
    before = live_state(shared)

    sent = sent_on_sync(trainer)

    assert_live_state_unchanged(shared, before)
    expected = merged_policy_state(shared, dequantized_fp32_base(path, shared.peft_model), tmp_path)
    assert_sent_is(sent, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- what this relies on in TRL and peft


RELIED_ON = {
    # the method PPOTrainer's vLLM backend overrides, and the TRL calls around it
    "trl VLLMGeneration._iter_named_params": (VLLMGeneration._iter_named_params, ["self"]),
    "trl VLLMGeneration.sync_weights": (VLLMGeneration.sync_weights, ["self"]),
    "trl VLLMGeneration._fix_param_name_to_vllm": (
        VLLMGeneration._fix_param_name_to_vllm,
        ["self", "name", "extra_prefixes"],
    ),
    "trl DistributedBackend.gather_params": (DistributedBackend.gather_params, ["self", "params"]),
    # what the tests stand in for
    "trl VLLMGeneration._init_vllm": (VLLMGeneration._init_vllm, ["self"]),
    "trl VLLMClient.update_named_params": (VLLMClient.update_named_params, ["self", "metadata", "named_params"]),
    "trl VLLMClient.reset_prefix_cache": (VLLMClient.reset_prefix_cache, ["self"]),
    # the peft calls that compute the merged weights out of place
    "peft lora.Linear.get_delta_weight": (peft.tuners.lora.Linear.get_delta_weight, ["self", "adapter"]),
    "peft lora.bnb.Linear4bit.get_delta_weight": (
        peft.tuners.lora.bnb.Linear4bit.get_delta_weight,
        ["self", "adapter"],
    ),
    "peft dequantize_module_weight": (peft.utils.integrations.dequantize_module_weight, ["module"]),
}


@pytest.mark.parametrize("what", sorted(RELIED_ON))
def test_trl_and_peft_methods_the_vllm_sync_relies_on_keep_their_signatures(what):
    function, parameters = RELIED_ON[what]
    actual = list(inspect.signature(function).parameters)
    assert actual == parameters, (
        f"{what} now takes {actual}, not {parameters} (trl {trl.__version__}, peft {peft.__version__}): check "
        "the shared base's vLLM weight sync (rlhf_ext/trainers/vllm_sync.py, SharedBaseVLLMGeneration)."
    )


def test_trl_still_sends_through_iter_named_params_and_builds_vllm_generation_in_grpo_init():
    # The override only takes effect if sync_weights reads the weights through _iter_named_params, and if the
    # trainer's backend is the VLLMGeneration that GRPOTrainer.__init__ builds.
    sync_source = inspect.getsource(VLLMGeneration.sync_weights)
    assert "self._iter_named_params()" in sync_source, (
        f"trl {trl.__version__}: VLLMGeneration.sync_weights no longer reads the weights through _iter_named_params"
    )
    assert "self.vllm_generation = VLLMGeneration(" in inspect.getsource(GRPOTrainer.__init__), (
        f"trl {trl.__version__}: GRPOTrainer.__init__ no longer builds self.vllm_generation = VLLMGeneration(...)"
    )


@pytest.mark.parametrize("layer", [peft.tuners.lora.Linear, peft.tuners.lora.bnb.Linear4bit], ids=lambda c: c.__name__)
def test_peft_still_merges_plain_lora_as_base_weight_plus_get_delta_weight(layer):
    # The sync adds get_delta_weight(adapter) to the (dequantized) base weight, as peft's own merge does for a plain
    # LoRA adapter (one without a variant such as DoRA).
    merge_source = inspect.getsource(layer.merge)
    assert "self.get_delta_weight(active_adapter)" in merge_source and "lora_variant" in merge_source, (
        f"peft {peft.__version__}: {layer.__qualname__}.merge no longer adds get_delta_weight to the base weight for a "
        "plain LoRA adapter; check the shared base's vLLM weight sync (rlhf_ext/trainers/vllm_sync.py)"
    )
