import pytest
import torch

from rlhf_ext.testing import save_tiny_model, tiny_causal_lm, tiny_tokenizer

# Tiny models: one thread is faster than two (no cross-thread handoff on every small op), and
# CI machines are small and shared.
torch.set_num_threads(1)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_model():
    return tiny_causal_lm(seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """A tiny Llama and its tokenizer saved to disk, for code that takes a model path."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def left_tokenizer():
    """The tiny tokenizer padding on the left, as generation (and so the PPO trainers) needs."""
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer
