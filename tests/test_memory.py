"""The memory estimate's parts against independent counts; its validation against measured runs is in
docs/benchmarks.md (benchmarks/real_size.py)."""

import pytest
import torch
from peft import get_peft_model

from rlhf_ext.memory import estimate, main, parameter_counts, saved_bytes_per_token_per_layer
from rlhf_ext.models import SharedBase, SharedBaseArguments, lora_config
from rlhf_ext.testing import tiny_causal_lm, tiny_llama_config

CONFIG = tiny_llama_config(hidden_size=64, num_layers=3, num_heads=4)


def test_parameter_counts_match_a_real_model():
    model = tiny_causal_lm(seed=0, hidden_size=64, num_layers=3, num_heads=4)
    counts = parameter_counts(CONFIG, lora_r=4)
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert counts.linear == linear
    assert counts.linear + counts.other == sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, lora_config(SharedBaseArguments(lora_r=4), "llama"))
    assert counts.lora == sum(p.numel() for n, p in peft.named_parameters() if ".lora_" in n)


def real_saved_bytes_per_token(dtype: torch.dtype, tokens: int = 24) -> float:
    """What a real CPU forward of one LoRA decoder layer saves for backward, per token."""
    model = tiny_causal_lm(seed=0, hidden_size=64, num_layers=1, num_heads=4).to(dtype)
    peft = get_peft_model(model, lora_config(SharedBaseArguments(lora_r=4, lora_dropout=0.0), "llama")).train()
    parameters = {p.untyped_storage().data_ptr() for p in peft.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    hidden = torch.randn(1, tokens, 64, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model.layers[0](hidden, position_embeddings=model.model.rotary_emb(hidden, positions),
                              attention_mask=None, position_ids=positions)
    return sum(saved.values()) / tokens


def test_activation_count_on_the_meta_device_equals_a_real_forward():
    for dtype in (torch.float32, torch.bfloat16):
        meta = saved_bytes_per_token_per_layer(CONFIG, dtype, lora_r=4, sequence_length=24)
        real = real_saved_bytes_per_token(dtype)  # PyTorch's flash attention for CPU, as in training
        assert abs(meta - real) <= 0.1 * real  # 0.1% in float32, 6% in bfloat16 (attention internals)


def test_terms_scale_as_worked_by_hand():
    def est(**kwargs):
        args = dict(stage="ppo", bits=32, lora_r=4, batch_size=2, prompt_length=8, completion_length=8, device="cuda")
        return estimate(CONFIG, **{**args, **kwargs})

    counts = parameter_counts(CONFIG, lora_r=4)
    fp32 = est()
    assert fp32.weights == 4 * (counts.linear + counts.other) + 3 * 4 * counts.lora  # base + 3 adapters, float32
    assert fp32.adapters_optimizer == 2 * counts.lora * 4 * 4  # policy + value: weight, grad, 2 moments
    assert est(optimizer="adamw_bnb_8bit").adapters_optimizer == 2 * counts.lora * (4 + 4 + 2)
    bf16 = est(bits=16)
    assert bf16.weights == 2 * (counts.linear + counts.other) + 3 * 4 * counts.lora  # peft keeps adapters float32
    nf4 = est(bits=4)  # compute in bfloat16 on a GPU: adapters in bfloat16 (QLoRA)
    by_hand = counts.linear // 2 + counts.linear // 64 + 2 * (counts.other - counts.norms) + 4 * counts.norms
    assert nf4.weights == by_hand + 3 * 2 * counts.lora
    plain, checkpointed = est(gradient_checkpointing=False), est()
    assert checkpointed.activations < plain.activations
    assert est(gradient_checkpointing=False, batch_size=4).activations == 2 * plain.activations
    assert est(stage="reward").logits == 0 and est(stage="dpo").adapters_optimizer == fp32.adapters_optimizer // 2


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_shared_prompts_count_one_row_per_list_and_its_mask(stage):
    """B lists of K completions: unshared B x K rows of P + R tokens; shared B rows of P - 1 + K (1 + R) tokens (the
    prompt once, its last token at the head of each segment) and a boolean L x L mask per row, worked by hand."""
    B, K, P, R = 3, 4, 20, 6
    args = dict(stage=stage, bits=32, lora_r=4, batch_size=B, prompt_length=P, completion_length=R, num_completions=K,
                device="cuda", gradient_checkpointing=False)  # fmt: skip
    unshared, shared = estimate(CONFIG, **args, shared_prompt=False), estimate(CONFIG, **args)
    length = P - 1 + K * (1 + R)
    per_layer = saved_bytes_per_token_per_layer(CONFIG, torch.float32, 4, length)
    assert shared.activations == int(B * length * 3 * per_layer + B * length**2)
    per_layer_unshared = saved_bytes_per_token_per_layer(CONFIG, torch.float32, 4, P + R)
    assert unshared.activations == int(B * K * (P + R) * 3 * per_layer_unshared)
    assert shared.activations < unshared.activations
    if stage == "dpo":  # the fused head projects the same B x K x R labelled tokens on a GPU
        assert shared.logits == unshared.logits


def test_estimate_of_a_shared_base_counts_its_real_adapters():
    shared = SharedBase(tiny_causal_lm(seed=0, hidden_size=64, num_layers=3, num_heads=4),
                        SharedBaseArguments(lora_r=4))
    assert sum(p.numel() for p in shared.trainable_parameters()) == 2 * parameter_counts(CONFIG, lora_r=4).lora + 65


def test_policy_trunk_layout_drops_the_value_adapter_and_its_forward():
    def est(**kwargs):
        args = dict(stage="ppo", bits=32, lora_r=4, batch_size=2, prompt_length=8, completion_length=8, device="cuda")
        return estimate(CONFIG, **{**args, **kwargs})

    lora = parameter_counts(CONFIG, lora_r=4).lora
    own, trunk = est(gradient_checkpointing=False), est(gradient_checkpointing=False, value_layout="policy_trunk")
    assert own.weights - trunk.weights == 4 * lora  # one float32 adapter fewer
    assert trunk.adapters_optimizer == own.adapters_optimizer // 2  # the policy adapter alone trains
    assert trunk.activations == own.activations // 2  # one forward's activations instead of two
    assert trunk.logits == own.logits
    shared = SharedBase(tiny_causal_lm(seed=0, hidden_size=64, num_layers=3, num_heads=4),
                        SharedBaseArguments(lora_r=4, value_layout="policy_trunk"))
    assert sum(p.numel() for p in shared.trainable_parameters()) == lora + 65  # policy adapter + value head
    assert est(stage="dpo", value_layout="policy_trunk") == est(stage="dpo")


def test_command_line_prints_one_row_per_stage(tmp_path, capsys):
    CONFIG.save_pretrained(tmp_path)
    main(["--model", str(tmp_path), "--bits", "16", "--batch_size", "1", "--prompt_length", "8"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[-3:]] == ["ppo", "dpo", "reward"]
