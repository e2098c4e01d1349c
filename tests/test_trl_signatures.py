"""The TRL, transformers and peft methods rlhf_ext overrides or calls still have the signatures it was written for.

TRL rewrites GRPOTrainer often (its private methods changed signature twice in 2026); an override whose parent
changed shape fails late and obscurely, or silently stops being called. Each row names the method and the
parameters our code passes or receives, in order; a failure names the method and the installed versions.
pyproject.toml states the TRL range these were checked with.
"""

import inspect

import peft
import pytest
import torch
import transformers
import trl
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel, Trainer
from trl import DPOTrainer, GRPOTrainer, RewardTrainer
from trl.trainer import utils as trl_utils

VERSIONS = f"trl {trl.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"

# (owner, method, the leading parameters rlhf_ext relies on, in order)
SIGNATURES = [
    # PPOTrainer and its base SharedBaseGRPOTrainer (rlhf_ext/trainers/ppo/trainer.py, grpo_base.py) override ...
    (GRPOTrainer, "_calculate_rewards", ["self", "inputs", "prompts", "completions", "completion_ids_list"]),
    (GRPOTrainer, "_tokenize_prompts", ["self", "prompts"]),
    (GRPOTrainer, "_generate_and_score_completions", ["self", "inputs"]),
    # (SharedPrefillGenerationMixin, rlhf_ext/trainers/shared_generation.py: each prompt prefilled once in generation)
    (GRPOTrainer, "_generate_single_turn",
     ["self", "prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"]),
    (GRPOTrainer, "_compute_loss", ["self", "model", "inputs"]),
    (Trainer, "_save", ["self", "output_dir", "state_dict"]),
    # (also OnlinePlackettLuceTrainer) re-classes the RepeatSampler it returns (rlhf_ext/trainers/sampling.py)
    (GRPOTrainer, "_get_train_sampler", ["self", "dataset"]),
    (trl_utils.RepeatSampler, "__init__", ["self", "data_source", "mini_repeat_count", "batch_size", "repeat_count",
                                           "shuffle", "seed"]),
    (Trainer, "_load_from_checkpoint", ["self", "resume_from_checkpoint", "model"]),
    (Trainer, "_get_grad_norm", ["self", "model", "grad_norm"]),  # a non-finite norm stops the run (issue 18)
    # ... and calls (and, for shared prompts, overrides: the rest of its parameters are passed on by name)
    (GRPOTrainer, "_get_per_token_logps_and_entropies",
     ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
      "compute_aux_loss"]),
    (trl_utils, "add_fused_lm_head", ["model", "temperature", "cast_lm_head_to_fp32"]),
    (trl_utils, "disable_dropout_in_model", ["model"]),
    (trl_utils, "create_model_from_path", ["model_id", "architecture"]),  # the policy from a path (load_policy)
    (trl_utils, "is_async_callable", ["func"]),
    # OnlinePlackettLuceTrainer (rlhf_ext/trainers/kway/online.py) reshapes the buffered batch to [groups, K, ...]
    # so that GRPOTrainer's shuffle and micro-batch split, which act on the first dimension, move whole groups
    (trl_utils, "shuffle_sequence_dict", ["seq_dict"]),
    (trl_utils, "split_tensor_dict", ["tensor_dict", "num_chunks"]),
    (PeftModel, "save_pretrained", ["self", "save_directory", "safe_serialization", "selected_adapters"]),
    # PlackettLuceDPOTrainer (rlhf_ext/trainers/kway/dpo.py) overrides ...
    (DPOTrainer, "_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
    (DPOTrainer, "_set_signature_columns_if_needed", ["self"]),
    (DPOTrainer, "_precompute_ref_logps", ["self", "dataset", "name", "batch_size"]),
    (DPOTrainer, "_compute_loss", ["self", "model", "inputs", "return_outputs"]),
    # ... and calls
    (DPOTrainer, "compute_ref_log_probs", ["self", "model", "inputs"]),
    # PlackettLuceRewardTrainer (rlhf_ext/trainers/kway/reward.py) overrides
    (RewardTrainer, "_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
    (RewardTrainer, "_set_signature_columns_if_needed", ["self"]),
    (RewardTrainer, "compute_loss", ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]),
    (RewardTrainer, "save_model", ["self", "output_dir", "_internal_call"]),
    # FaultTolerantMixin (rlhf_ext/trainers/fault_tolerance.py), in all four trainers, overrides
    (Trainer, "train", ["self", "resume_from_checkpoint", "trial"]),
    (Trainer, "_save_checkpoint", ["self", "model", "trial"]),
    (Trainer, "_get_output_dir", ["self", "trial"]),
    (Trainer, "_push_from_checkpoint", ["self", "checkpoint_folder"]),
    # exact gradient checkpointing (rlhf_ext/models/checkpointing.py) wraps
    (PreTrainedModel, "_set_gradient_checkpointing", ["self", "enable", "gradient_checkpointing_func"]),
    # the shared prefill of generation (rlhf_ext/models/shared_generation.py) calls
    (transformers.DynamicCache, "__init__", ["self", "ddp_cache_data", "config"]),
    (transformers.DynamicCache, "batch_select_indices", ["self", "indices"]),
    (transformers.GenerationConfig, "get_generation_mode", ["self", "assistant_model"]),
]


@pytest.mark.parametrize("owner, name, expected", SIGNATURES,
                         ids=[f"{getattr(o, '__name__', o)}.{n}" for o, n, _ in SIGNATURES])
def test_signature_is_the_one_rlhf_ext_was_written_for(owner, name, expected):
    function = getattr(owner, name, None)
    label = f"{getattr(owner, '__name__', owner)}.{name}"
    assert function is not None, f"{label} no longer exists ({VERSIONS}); rlhf_ext overrides or calls it"
    parameters = list(inspect.signature(function).parameters)
    assert parameters[: len(expected)] == expected, (
        f"{label} now takes {parameters} ({VERSIONS}); rlhf_ext was written for {expected}"
    )


def test_grpo_trainer_still_has_the_rollout_hooks_the_prompt_check_reads():
    """PPOTrainer checks prompt lengths up front unless environments or a rollout function change them later."""
    source = inspect.getsource(GRPOTrainer.__init__)
    for attribute in ("self.environment_factories", "self.rollout_func"):
        assert attribute in source, f"GRPOTrainer no longer sets {attribute} ({VERSIONS})"


def test_trl_trainers_still_set_the_moe_aux_loss_switches_our_losses_read():
    """PPO, online K-way and PL-DPO add the MoE router loss by GRPOTrainer's / DPOTrainer's own switches."""
    for trainer in (GRPOTrainer, DPOTrainer):
        source = inspect.getsource(trainer.__init__)
        for attribute in ("self.aux_loss_enabled", "self.router_aux_loss_coef"):
            assert attribute in source, f"{trainer.__name__} no longer sets {attribute} ({VERSIONS})"


def test_grpo_trainer_still_takes_the_multi_turn_arguments_and_masks_tool_tokens_by_tool_mask():
    """PPO and online K-way pass tools / rollout_func / environment_factory on and leave `tool_mask` tokens out of
    their losses (PPO: out of its per-token rewards and GAE too)."""
    parameters = inspect.signature(GRPOTrainer.__init__).parameters
    for name in ("tools", "rollout_func", "environment_factory"):
        assert name in parameters, f"GRPOTrainer.__init__ no longer takes {name} ({VERSIONS})"
    assert '"env_mask"' in inspect.getsource(GRPOTrainer._generate), f"rollout_func's env_mask renamed ({VERSIONS})"
    assert '"tool_mask"' in inspect.getsource(GRPOTrainer._generate_and_score_completions), VERSIONS


def test_dpo_trainer_still_asks_the_fused_head_for_the_token_metrics_pl_dpo_logs():
    """PlackettLuceDPOTrainer reads entropy, mean_logits and is_top1 from the outputs of the fused LM head that
    DPOTrainer.__init__ installs (its `entropy`, `logits/*` and `mean_token_accuracy` metrics)."""
    source = inspect.getsource(DPOTrainer.__init__)
    for output in ('"entropy"', '"mean_logits"', '"is_top1"'):
        assert output in source, f"DPOTrainer no longer asks the fused head for {output} ({VERSIONS})"


def test_peft_tuner_layers_keep_the_adapter_state_checkpointing_sets():
    """The exact checkpointing writes these two attributes directly (set_adapter would flip requires_grad)."""
    from peft import LoraConfig, get_peft_model

    from rlhf_ext.testing import tiny_causal_lm

    model = get_peft_model(tiny_causal_lm(seed=0), LoraConfig(r=2))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    for layer in layers:
        assert layer._active_adapter == layer.active_adapter, f"peft {peft.__version__} renamed _active_adapter"
        assert layer._disable_adapters == layer.disable_adapters, f"peft {peft.__version__} renamed _disable_adapters"
    model.base_model.disable_adapter_layers()
    assert all(layer._disable_adapters for layer in layers), f"peft {peft.__version__}: disabling no longer sets it"


def test_transformers_layers_still_checkpoint_through_the_per_layer_function():
    """transformers' GradientCheckpointingLayer must call `self._gradient_checkpointing_func`, which we wrap."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from rlhf_ext.testing import tiny_causal_lm

    model = tiny_causal_lm(seed=0)
    model.gradient_checkpointing_enable()
    layer = model.model.layers[0]
    assert isinstance(layer, GradientCheckpointingLayer)
    calls = []
    original = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or original(*a, **k)
    model.train()
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    assert calls, f"transformers {transformers.__version__} no longer calls _gradient_checkpointing_func"


def test_trl_splits_and_shuffles_the_buffered_batch_along_its_first_dimension():
    """The online K-way trainer keeps each ranked group whole by making it one row of the first dimension."""
    groups = torch.arange(24).view(4, 3, 2)  # 4 groups of K=3 completions
    halves = trl_utils.split_tensor_dict({"x": groups}, 2)
    assert [h["x"].tolist() for h in halves] == [groups[:2].tolist(), groups[2:].tolist()], VERSIONS
    shuffled = trl_utils.shuffle_sequence_dict({"x": groups})["x"]
    assert sorted(shuffled.tolist()) == sorted(groups.tolist()), f"rows were split or mixed ({VERSIONS})"


def test_dpo_reference_pass_and_fused_head_are_what_the_shared_prompt_layout_reuses():
    """With `shared_prompt`, PL-DPO runs its reference pass in DPOTrainer.compute_ref_log_probs' context
    (`rlhf_ext.trainers.kway.common.reference_forward`: that method sums whole rows, and a shared row holds K
    completions) and gives the fused LM head pre-shifted labels (`shift_labels`)."""
    source = inspect.getsource(DPOTrainer.compute_ref_log_probs)
    for piece in ("torch.no_grad()", "disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kw",
                  "use_adapter(", 'adapter_name="ref" if "ref" in', "self.accelerator.autocast()",
                  "self.ref_model is None and is_peft_model(self.model)"):
        assert piece in source, f"DPOTrainer.compute_ref_log_probs changed its context ({VERSIONS}): {piece}"
    assert "shift_labels" in inspect.getsource(trl_utils.add_fused_lm_head), VERSIONS


def test_grpo_forward_is_the_one_the_shared_prompt_groups_reproduce():
    """With `shared_prompt`, SharedBaseGRPOTrainer._get_per_token_logps_and_entropies gives what TRL's gives: the
    completion's labels (not padding, not the prompt) scored by the fused LM head under accelerate's autocast, the
    last `logits_to_keep` columns kept, and no position ids (so a token's position is its column: the shared rows
    give each token that column)."""
    source = inspect.getsource(GRPOTrainer._get_per_token_logps_and_entropies)
    for piece in ("labels = input_ids_batch.masked_fill(attention_mask_batch == 0, -100)",
                  "labels[:, :-logits_to_keep] = -100", "with self.accelerator.autocast():",
                  "model(**model_inputs, labels=labels, fused_lm_head=True)", "outputs.log_probs[:, -logits_to_keep:]",
                  "outputs.entropy[:, -logits_to_keep:]"):
        assert piece in source, f"GRPOTrainer._get_per_token_logps_and_entropies changed ({VERSIONS}): {piece}"
    assert '"position_ids"' not in source, f"GRPOTrainer's forward now passes position ids ({VERSIONS})"
    assert 'outputs=("log_probs", "entropy")' in inspect.getsource(GRPOTrainer.__init__), VERSIONS
