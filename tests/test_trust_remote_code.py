"""PPO and online K-way load a policy given as a path with `args.trust_remote_code`, as TRL's GRPOTrainer does."""

import json

import pytest
from datasets import Dataset
from grpo_family import tiny_run

from rlhf_ext.testing import fraction_of_a, save_tiny_model, tiny_tokenizer

# A model folder whose classes live in the folder itself, as on the Hub for models transformers does not ship.
MODELING = '''
from transformers import LlamaConfig, LlamaForCausalLM


class RemoteConfig(LlamaConfig):
    model_type = "remote_llama"


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
'''


@pytest.fixture
def remote_code_model(tmp_path):
    path = save_tiny_model(tmp_path / "remote")
    (tmp_path / "remote" / "modeling_remote.py").write_text(MODELING)
    config = json.loads((tmp_path / "remote" / "config.json").read_text())
    config["model_type"], config["architectures"] = "remote_llama", ["RemoteForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "modeling_remote.RemoteConfig", "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
    }
    (tmp_path / "remote" / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("trainer_name", ["ppo", "online"])
@pytest.mark.parametrize("trust", [True, False])
def test_policy_path_is_loaded_with_trust_remote_code(remote_code_model, tmp_path, trainer_name, trust, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    trainer_class, args = tiny_run(trainer_name, tmp_path / "out", trust_remote_code=trust)
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    kwargs = dict(reward_funcs=fraction_of_a, args=args, processing_class=tok,
                  train_dataset=Dataset.from_list([{"prompt": "ab"}, {"prompt": "cd"}]))
    if trainer_name == "ppo":
        from transformers import AutoModelForSequenceClassification

        from rlhf_ext.testing import tiny_llama_config

        kwargs["value_model"] = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    if not trust:
        with pytest.raises(ValueError, match="trust_remote_code"):
            trainer_class(remote_code_model, **kwargs)
        return
    trainer = trainer_class(remote_code_model, **kwargs)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert type(policy).__name__ == "RemoteForCausalLM"
