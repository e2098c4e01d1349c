import torch

from demo.generation import (
    SamplingConfig,
    completion_logprobs,
    load_model_and_tokenizer,
    mask_after_first_eos,
    sample_batch,
)
from demo.prompts import as_conversation
from demo.tiny import save_tiny_word_model


def test_mask_after_first_eos_keeps_the_eos_and_drops_what_follows():
    ids = torch.tensor([[5, 6, 2, 2, 7], [5, 2, 6, 6, 6], [5, 6, 7, 8, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask_after_first_eos(ids, eos_token_id=2), expected)


def test_batched_left_padded_logprobs_match_each_sequence_alone(tmp_path):
    model, tokenizer = load_model_and_tokenizer(save_tiny_word_model(tmp_path / "tiny"))
    prompts = ["Hi.", "Tell me about your morning and the weather today."]  # different lengths: padding
    batch = sample_batch(model, tokenizer, [as_conversation(p) for p in prompts], 2, SamplingConfig(max_new_tokens=6))
    batched = completion_logprobs(model, batch)
    for row in range(batch.sequences.shape[0]):
        real = batch.attention_mask[row].bool()
        alone = batch.sequences[row][real].unsqueeze(0)  # no padding at all
        with torch.no_grad():
            logprobs = torch.log_softmax(model(alone).logits[0, :-1], -1).gather(-1, alone[0, 1:, None]).squeeze(-1)
        n_completion = int(batch.completion_mask[row].sum())
        expected = logprobs[-n_completion:]
        assert torch.allclose(batched[row][batch.completion_mask[row]], expected, atol=1e-5)


def test_sample_batch_decodes_one_text_per_completion(tmp_path):
    model, tokenizer = load_model_and_tokenizer(save_tiny_word_model(tmp_path / "tiny"))
    batch = sample_batch(model, tokenizer, [as_conversation("Hi.")] * 3, 2, SamplingConfig(max_new_tokens=5))
    assert len(batch.texts) == 6 and batch.completion_mask.shape == (6, batch.sequences.shape[1] - batch.prompt_length)
    assert all(isinstance(t, str) for t in batch.texts)


def test_logprobs_read_from_generate_match_a_separate_forward(tmp_path):
    model, tokenizer = load_model_and_tokenizer(save_tiny_word_model(tmp_path / "tiny"))
    prompts = ["Hi.", "Tell me about your morning and the weather today."]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.7)  # logprobs are the model's, not the tempered ones
    batch = sample_batch(model, tokenizer, [as_conversation(p) for p in prompts], 2, sampling, with_logprobs=True)
    assert torch.allclose(batch.logprobs, completion_logprobs(model, batch), atol=1e-5)
    assert (batch.logprobs[~batch.completion_mask] == 0).all()


def test_adapter_is_merged_with_the_outputs_of_the_unmerged_model(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    path = save_tiny_word_model(tmp_path / "tiny")
    base, tokenizer = load_model_and_tokenizer(path)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # random B: not a no-op
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    merged, _ = load_model_and_tokenizer(path, str(tmp_path / "adapter"))
    unmerged = PeftModel.from_pretrained(load_model_and_tokenizer(path)[0], tmp_path / "adapter").eval()
    ids = tokenizer("Tell me about your morning.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = unmerged(ids).logits, merged(ids).logits
    assert not isinstance(merged, PeftModel)
    assert not torch.allclose(expected, load_model_and_tokenizer(path)[0](ids).logits, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-5)
