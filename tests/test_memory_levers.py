"""The memory levers of docs/shared-base.md, each doing what it promises on a PPO update of the shared base."""

import pytest
import torch
from datasets import Dataset

from rlhf_ext.models import SharedBase, SharedBaseArguments
from rlhf_ext.testing import fraction_of_a, tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer


def ppo_trainer(tmp_path, lora_r: int = 4, hidden_size: int = 32, **overrides) -> PPOTrainer:
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    shared = SharedBase(tiny_causal_lm(seed=0, hidden_size=hidden_size),
                        SharedBaseArguments(lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0))
    args = PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_completion_length=6, max_steps=1,
                     num_ppo_epochs=1, learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                     disable_tqdm=True, seed=0, **overrides)
    return PPOTrainer(shared, reward_funcs=fraction_of_a, args=args, processing_class=tokenizer,
                      train_dataset=Dataset.from_dict({"prompt": ["abc", "hello", "xy", "qrs"] * 2}))


def test_8bit_adamw_keeps_the_moments_of_the_adapters_in_one_byte(tmp_path):
    # rank 64 on hidden 64: lora_A has 4096 weights, bitsandbytes' threshold for 8-bit state
    trainer = ppo_trainer(tmp_path, lora_r=64, hidden_size=64, optim="adamw_bnb_8bit")
    before = {id(p): p.detach().clone() for p in trainer.shared_base.trainable_parameters()}
    trainer.train()
    states = trainer.optimizer.optimizer.state if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.state
    large = [p for p in trainer.shared_base.trainable_parameters() if p.numel() >= 4096]
    assert large and all(states[p]["state1"].dtype == torch.uint8 for p in large)
    assert all(states[p]["state2"].dtype == torch.uint8 for p in large)
    assert any(not torch.equal(before[id(p)], p) for p in large), "8-bit AdamW did not update the adapters"


def test_an_unknown_optimizer_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="adamw_bnb_9bit"):
        ppo_trainer(tmp_path, optim="adamw_bnb_9bit")


@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_update_keeps_no_batch_by_vocabulary_tensor_for_backward(tmp_path, checkpointing):
    """Log-probs and entropy come from TRL's fused LM head: backward keeps no [B, T, V] logits or softmax."""
    trainer = ppo_trainer(tmp_path, gradient_checkpointing=checkpointing)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in ["abc", "hello", "xy", "qrs"]])
    vocabulary = trainer.model.config.vocab_size
    tokens = batch["completion_ids"].numel()
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer._compute_loss(trainer.model, batch).backward()
    assert saved, "nothing was saved for backward: the check would be vacuous"
    by_vocabulary = [s for s in saved if s and s[-1] == vocabulary and torch.Size(s).numel() >= tokens * vocabulary]
    assert not by_vocabulary, f"tensors of the logits' size kept for backward: {by_vocabulary[:3]}"
