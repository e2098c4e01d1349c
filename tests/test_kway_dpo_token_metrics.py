"""PL-DPO logs TRL's token metrics (issue 21, "Also"): entropy, mean_token_accuracy, logits/chosen, logits/rejected.

At K=2 they are DPOTrainer's numbers on the same batch. For K > 2 "chosen" is the best completion and "rejected" the
other completions' tokens together, which is what DPOTrainer logs for the K-1 pairs (best, other) of one list: the
best completion repeated K-1 times weighs its tokens as it weighs them once.
"""

import pytest
from datasets import Dataset
from kway_records import LISTS, PAIRS
from trl import DPOConfig, DPOTrainer

from rlhf_ext.testing import tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers import PlackettLuceDPOConfig, PlackettLuceDPOTrainer

TOKEN_METRICS = ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected")


def evaluate(trainer_class, config_class, model_path, tmp_path, records) -> dict:
    """Metrics of one eval batch holding every record, the policy at `model_path`, a differently seeded reference."""
    args = config_class(
        output_dir=str(tmp_path / trainer_class.__name__), per_device_eval_batch_size=len(records), report_to="none",
        bf16=False, use_cpu=True, gradient_checkpointing=False, disable_tqdm=True, max_length=64, beta=0.5, seed=0,
    )  # fmt: skip
    data = Dataset.from_list(records)
    trainer = trainer_class(
        model=model_path, ref_model=tiny_causal_lm(seed=1), args=args, train_dataset=data, eval_dataset=data,
        processing_class=tiny_tokenizer(),
    )  # fmt: skip
    return trainer.evaluate()


def test_k2_token_metrics_are_trl_dpo_metrics(model_path, tmp_path):
    expected = evaluate(DPOTrainer, DPOConfig, model_path, tmp_path, PAIRS)
    got = evaluate(PlackettLuceDPOTrainer, PlackettLuceDPOConfig, model_path, tmp_path, PAIRS)
    for name in TOKEN_METRICS:
        assert got[f"eval_{name}"] == pytest.approx(expected[f"eval_{name}"], rel=1e-5, abs=1e-6), name
    assert expected["eval_logits/chosen"] != pytest.approx(expected["eval_logits/rejected"])  # a real check


def test_k4_chosen_is_the_best_completion_and_rejected_the_others_tokens(model_path, tmp_path):
    ranked = LISTS[1]  # four completions, best first
    best, *others = ranked["completions"]
    pairs = [{"prompt": ranked["prompt"], "chosen": best, "rejected": other} for other in others]
    expected = evaluate(DPOTrainer, DPOConfig, model_path, tmp_path, pairs)
    got = evaluate(PlackettLuceDPOTrainer, PlackettLuceDPOConfig, model_path, tmp_path, [ranked])
    for name in ("mean_token_accuracy", "logits/chosen", "logits/rejected"):
        assert got[f"eval_{name}"] == pytest.approx(expected[f"eval_{name}"], rel=1e-5, abs=1e-6), name
    assert "eval_entropy" in got
