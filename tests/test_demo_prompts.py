import random

import pytest

from demo.prompts import (
    as_conversation,
    demo_split,
    load_prompts,
    split_prompts,
)


def test_prompts_file_has_enough_distinct_short_prompts():
    prompts = load_prompts()
    assert len(prompts) >= 330
    assert len({p.lower() for p in prompts}) == len(prompts)  # no duplicates, even up to case
    assert all(len(p) <= 80 and p[-1] in ".?!" for p in prompts)


def test_demo_split_is_disjoint_and_fixed():
    split = demo_split()
    assert len(split.heldout) == 60 and len(split.train) == len(load_prompts()) - 60
    assert not set(split.train) & set(split.heldout)
    assert demo_split() == split


def test_split_does_not_depend_on_file_order():
    prompts = load_prompts()
    shuffled = prompts[:]
    random.Random(0).shuffle(shuffled)
    assert set(split_prompts(shuffled).heldout) == set(split_prompts(prompts).heldout)


def test_fewer_training_prompts_keep_the_same_heldout_set():
    full, small = demo_split(), demo_split(n_train=10)
    assert small.heldout == full.heldout
    assert small.train == full.train[:10]


def test_duplicate_prompt_is_a_clear_error(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hello there.\nHow are you?\nHello there.\n")
    with pytest.raises(ValueError, match="prompt 3 is a duplicate"):
        load_prompts(path)


def test_split_rejects_a_heldout_size_that_leaves_no_training_prompts():
    with pytest.raises(ValueError, match="n_heldout"):
        split_prompts(["a", "b"], n_heldout=2)


def test_as_conversation_with_and_without_system_turn():
    assert as_conversation("Hi.") == [{"role": "user", "content": "Hi."}]
    assert as_conversation("Hi.", "") == [{"role": "system", "content": ""}, {"role": "user", "content": "Hi."}]
