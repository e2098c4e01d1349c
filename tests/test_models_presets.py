"""LoRA / quantization presets and the arguments recipes parse."""

import copy
import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from trl import TrlParser

from rlhf_ext.models import (
    SharedBase,
    SharedBaseArguments,
    lora_config,
    lora_target_modules_for,
    quantization_config,
)
from rlhf_ext.testing import tiny_causal_lm


def test_every_argument_has_a_help_string():
    missing = [f.name for f in dataclasses.fields(SharedBaseArguments) if not f.metadata.get("help")]
    assert missing == []


def test_trl_parser_reads_quantization_and_lora_flags():
    (args,) = TrlParser(SharedBaseArguments).parse_args_into_dataclasses(
        ["--model_name_or_path", "m", "--load_in_4bit", "--lora_r", "8", "--lora_alpha", "16",
         "--lora_target_modules", "q_proj", "v_proj", "--dtype", "bfloat16"]
    )
    assert (args.load_in_4bit, args.lora_r, args.lora_alpha) == (True, 8, 16)
    assert args.lora_target_modules == ["q_proj", "v_proj"]
    assert args.torch_dtype is torch.bfloat16


def test_4bit_and_8bit_together_is_an_error():
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit"):
        SharedBaseArguments(load_in_4bit=True, load_in_8bit=True)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
def test_llama_style_architectures_target_every_projection(model_type):
    config = lora_config(SharedBaseArguments(lora_r=8, lora_alpha=16), model_type)
    assert config.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (config.r, config.lora_alpha, config.fan_in_fan_out) == (8, 16, False)


def test_gpt2_preset_and_fallback_and_override():
    gpt2 = lora_config(SharedBaseArguments(), "gpt2")
    assert gpt2.target_modules == {"c_attn", "c_proj", "c_fc"} and gpt2.fan_in_fan_out
    assert lora_target_modules_for("some_new_arch") == "all-linear"
    override = lora_config(SharedBaseArguments(lora_target_modules=["q_proj"]), "llama")
    assert override.target_modules == {"q_proj"}


def test_quantization_presets():
    nf4 = quantization_config(SharedBaseArguments(load_in_4bit=True, dtype="bfloat16"))
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype is torch.bfloat16
    assert quantization_config(SharedBaseArguments(load_in_8bit=True)).load_in_8bit
    assert quantization_config(SharedBaseArguments()) is None


def test_gpt2_base_shares_its_roles_and_round_trips_a_value_folder(tmp_path):
    """GPT-2 keeps its projections in Conv1D (weight [in, out]): the preset and the folder checks must cope."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, bos_token_id=1, eos_token_id=2)
    base = GPT2LMHeadModel(config).eval()  # GPT-2 has dropout; compare without it
    shared = SharedBase(copy.deepcopy(base), SharedBaseArguments(lora_r=4, lora_dropout=0.0)).eval()
    input_ids = torch.randint(0, 101, (2, 6))
    assert torch.equal(shared.reference_logits(input_ids), base(input_ids).logits)
    shared.save_role("value", tmp_path / "value")
    reload_args = SharedBaseArguments(lora_r=4, value_adapter_path=str(tmp_path / "value"))
    reloaded = SharedBase(copy.deepcopy(base), reload_args)
    reloaded.eval()
    assert torch.equal(reloaded.values(input_ids), shared.values(input_ids))

    llama = SharedBase(tiny_causal_lm(hidden_size=32), SharedBaseArguments(lora_r=4))
    with pytest.raises(ValueError, match=r"value.*'transformer\.h\.0\..*another architecture"):
        llama.load_role("value", tmp_path / "value")
