import pytest
import torch

from rlhf_ext.testing import tiny_causal_lm, tiny_tokenizer

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
