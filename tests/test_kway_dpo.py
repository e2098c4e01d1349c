import inspect
import math

import pytest
import torch
from datasets import Dataset
from kway_records import LISTS, PAIRS
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

import rlhf_ext
from rlhf_ext.testing import tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers import PlackettLuceDPOConfig, PlackettLuceDPOTrainer
from rlhf_ext.trainers.kway import common as kway_common
from rlhf_ext.trainers.kway import dpo as kway_dpo
from rlhf_ext.trainers.kway import reward as kway_reward

BETA = 0.5


@pytest.fixture(scope="module")
def trainer(model_path, tmp_path_factory):
    """One K-way DPO trainer shared by the tests that only evaluate (each restores any arg it changes)."""
    return pl_trainer(model_path, tmp_path_factory.mktemp("out"), PAIRS)


def evaluate(trainer, records, **arg_overrides) -> float:
    """eval_loss of `records` with some trainer args temporarily changed."""
    saved = {name: getattr(trainer.args, name) for name in arg_overrides}
    for name, value in arg_overrides.items():
        setattr(trainer.args, name, value)
    try:
        return trainer.evaluate(eval_dataset=Dataset.from_list(records))["eval_loss"]
    finally:
        for name, value in saved.items():
            setattr(trainer.args, name, value)


def common_args(tmp_path, **overrides):
    args = dict(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", bf16=False, use_cpu=True,
        gradient_checkpointing=False, disable_tqdm=True, max_length=64, beta=BETA, seed=0,
    )
    return {**args, **overrides}


def pl_trainer(model_path, tmp_path, eval_records, ref_model="seed1", **overrides):
    """A K-way DPO trainer whose reference (by default) is a differently seeded model, so rewards are not 0."""
    ref = tiny_causal_lm(seed=1) if ref_model == "seed1" else ref_model
    return PlackettLuceDPOTrainer(
        model=model_path, ref_model=ref, args=PlackettLuceDPOConfig(**common_args(tmp_path, **overrides)),
        train_dataset=Dataset.from_list(eval_records), eval_dataset=Dataset.from_list(eval_records),
        processing_class=tiny_tokenizer(),
    )


def completion_logp(model, prompt: str, completion: str) -> float:
    """log p(completion + EOS | prompt), one sequence at a time, from the plain logits (no collator, no fused head)."""
    tok = tiny_tokenizer()
    prompt_len = len(tok(prompt)["input_ids"])
    ids = torch.tensor([tok(prompt + completion + tok.eos_token)["input_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids, fused_lm_head=False).logits[0].double(), dim=-1)
    return sum(logps[t - 1, ids[0, t]].item() for t in range(prompt_len, ids.shape[1]))


def plackett_luce_nll(scores: list[float], top_m: int | None = None) -> float:
    """-log P(order) by the sequential-choice definition: pick the k-th best among the remaining items."""
    m = len(scores) - 1 if top_m is None else min(top_m, len(scores) - 1)
    log_p = 0.0
    for k in range(m):
        remaining = [math.exp(s) for s in scores[k:]]
        log_p += math.log(remaining[0] / sum(remaining))
    return -log_p


def expected_dpo_loss(policy, ref, records, top_m=None) -> float:
    losses = []
    for record in records:
        scores = [BETA * (completion_logp(policy, record["prompt"], y) - completion_logp(ref, record["prompt"], y))
                  for y in record["completions"]]
        losses.append(plackett_luce_nll(scores, top_m))
    return sum(losses) / len(losses)


def test_k2_pairwise_data_matches_trl_sigmoid_dpo(model_path, tmp_path, trainer):
    trl_trainer = DPOTrainer(
        model=model_path, ref_model=tiny_causal_lm(seed=1), args=DPOConfig(**common_args(tmp_path)),
        train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS),
        processing_class=tiny_tokenizer(),
    )
    expected = trl_trainer.evaluate()
    got = trainer.evaluate()
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)
    assert expected["eval_loss"] != pytest.approx(math.log(2), abs=1e-3)  # policy != reference: a real check
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert got[f"eval_{name}"] == pytest.approx(expected[f"eval_{name}"], abs=1e-5), name

    # the same records in the ranked format: best first, by ranking, by scores
    ranked = [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]]} for r in PAIRS]
    by_ranking = [{"prompt": r["prompt"], "completions": [r["rejected"], r["chosen"]], "ranking": [1, 0]}
                  for r in PAIRS]
    by_scores = [{"prompt": r["prompt"], "completions": [r["rejected"], r["chosen"]], "scores": [-1.0, 2.5]}
                 for r in PAIRS]
    for records in (ranked, by_ranking, by_scores):
        assert evaluate(trainer, records) == pytest.approx(expected["eval_loss"], abs=1e-5)


def test_k2_length_normalization_matches_trl_sigmoid_norm(model_path, tmp_path, trainer):
    trl_trainer = DPOTrainer(
        model=model_path, ref_model=tiny_causal_lm(seed=1),
        args=DPOConfig(**common_args(tmp_path, loss_type=["sigmoid_norm"])),
        train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS),
        processing_class=tiny_tokenizer(),
    )
    expected = trl_trainer.evaluate()["eval_loss"]
    assert evaluate(trainer, PAIRS, length_normalization=True) == pytest.approx(expected, abs=1e-5)


def test_k3_k4_loss_is_the_plackett_luce_probability_and_mixed_batches_agree(trainer):
    expected = expected_dpo_loss(tiny_causal_lm(seed=0), tiny_causal_lm(seed=1), LISTS)
    # one batch holding lists of K = 3, 4, 2, 4, then the lists one by one
    assert evaluate(trainer, LISTS, per_device_eval_batch_size=4) == pytest.approx(expected, abs=1e-5)
    assert evaluate(trainer, LISTS, per_device_eval_batch_size=1) == pytest.approx(expected, abs=1e-5)

    expected_top1 = expected_dpo_loss(tiny_causal_lm(seed=0), tiny_causal_lm(seed=1), LISTS, top_m=1)
    assert evaluate(trainer, LISTS, top_m=1) == pytest.approx(expected_top1, abs=1e-5)


def test_tied_scores_keep_only_the_known_part_of_the_ranking(trainer):
    # scores: aa 5 > {b, ccc} tied at 3: only "aa beats the other two" is known, so the loss is the top-1 term
    records = [{"prompt": "q1 ", "completions": ["ccc", "aa", "b"], "scores": [3.0, 5.0, 3.0]}]
    expected = expected_dpo_loss(tiny_causal_lm(seed=0), tiny_causal_lm(seed=1), LISTS[:1], top_m=1)
    assert evaluate(trainer, records) == pytest.approx(expected, abs=1e-5)


def test_precomputed_reference_logps_give_the_same_loss(model_path, tmp_path):
    trainer = pl_trainer(model_path, tmp_path, LISTS, precompute_ref_log_probs=True, per_device_eval_batch_size=3)
    assert [len(v) for v in trainer.eval_dataset["ref_logps"]] == [3, 4, 2, 4]
    expected = expected_dpo_loss(tiny_causal_lm(seed=0), tiny_causal_lm(seed=1), LISTS)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, abs=1e-5)


def test_lora_reference_is_the_base_with_the_adapter_off(model_path, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = PlackettLuceDPOTrainer(
        model=model_path, args=PlackettLuceDPOConfig(**common_args(tmp_path)), peft_config=lora,
        train_dataset=Dataset.from_list(LISTS), eval_dataset=Dataset.from_list(LISTS),
        processing_class=tiny_tokenizer(),
    )
    with torch.no_grad():  # move the adapter away from its zero init, so policy != base
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    expected = expected_dpo_loss(trainer.model, _AdapterOff(trainer.model), LISTS)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, abs=1e-5)
    all_zero_rewards = sum(math.log(math.factorial(len(r["completions"]))) for r in LISTS) / len(LISTS)
    assert expected != pytest.approx(all_zero_rewards, abs=1e-3)


@pytest.mark.parametrize(("peft_kwargs", "refused"), [
    (dict(target_modules=["q_proj", "lm_head"]), True),  # TRL refuses it: its fused LM head would skip the LoRA
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), False),  # a trained copy of the head itself
])  # fmt: skip
def test_an_adapter_on_the_lm_head_is_refused(model_path, tmp_path, peft_kwargs, refused):
    def build():
        return PlackettLuceDPOTrainer(
            model=model_path, args=PlackettLuceDPOConfig(**common_args(tmp_path)),
            peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **peft_kwargs),
            train_dataset=Dataset.from_list(LISTS), processing_class=tiny_tokenizer(),
        )  # fmt: skip

    if refused:
        with pytest.raises(ValueError, match="PEFT adapter to `lm_head` is not supported"):
            build()
    else:
        build()


class _AdapterOff:
    """A peft model called with its adapters disabled: the base model."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)


@pytest.mark.parametrize(
    "overrides", [{"loss_type": ["hinge"]}, {"ld_alpha": 0.5}, {"use_weighting": True}, {"top_m": 0}]
)
def test_config_rejects_what_the_plackett_luce_loss_does_not_do(tmp_path, overrides):
    with pytest.raises(ValueError):
        PlackettLuceDPOConfig(**common_args(tmp_path, **overrides))


def test_training_on_mixed_k_lists_lowers_the_loss(model_path, tmp_path):
    # lists of K = 3, 4, 2, 4 in one batch, with length normalization
    trainer = pl_trainer(model_path, tmp_path, LISTS, length_normalization=True, per_device_train_batch_size=4,
                         max_steps=5, learning_rate=1e-2, logging_steps=1)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 5 and all(math.isfinite(loss) for loss in losses)
    assert trainer.evaluate()["eval_loss"] < before - 0.1


# --- record layouts, empty datasets, module layout ----------------------------------------------------------------


def chat(role: str, content: str) -> list[dict]:
    return [{"role": role, "content": content}]


CHAT_PAIRS = [{"prompt": chat("user", r["prompt"]), "chosen": chat("assistant", r["chosen"]),
               "rejected": chat("assistant", r["rejected"])} for r in PAIRS]


def test_k2_chat_lists_match_trl_dpo_on_conversational_pairs(model_path, tmp_path, trainer):
    trl_trainer = DPOTrainer(
        model=model_path, ref_model=tiny_causal_lm(seed=1), args=DPOConfig(**common_args(tmp_path)),
        train_dataset=Dataset.from_list(CHAT_PAIRS), eval_dataset=Dataset.from_list(CHAT_PAIRS),
        processing_class=tiny_tokenizer(),
    )
    expected = trl_trainer.evaluate()["eval_loss"]
    chat_lists = [{"prompt": r["prompt"], "completions": [r["rejected"], r["chosen"]], "ranking": [1, 0]}
                  for r in CHAT_PAIRS]
    assert evaluate(trainer, chat_lists) == pytest.approx(expected, abs=1e-5)
    assert evaluate(trainer, CHAT_PAIRS) == pytest.approx(expected, abs=1e-5)
    assert expected != pytest.approx(evaluate(trainer, PAIRS), abs=1e-4)  # the chat template was applied


def ultrafeedback_layout(lists: list[dict]) -> list[dict]:
    """`lists` (best first) laid out as openbmb/UltraFeedback's records, worst first with descending scores."""
    records = []
    for record in lists:
        k = len(record["completions"])
        completions = [
            {"annotations": {"helpfulness": {"Rating": "4", "Rationale": "ok"}}, "critique": "fine",
             "custom_system_prompt": "", "fine-grained_score": float(rank), "model": f"m{rank}",
             "overall_score": 2.5 * (k - rank), "principle": "helpfulness", "response": text}
            for rank, text in reversed(list(enumerate(record["completions"])))
        ]
        records.append({"source": "test", "instruction": record["prompt"], "models": [c["model"] for c in completions],
                        "completions": completions, "correct_answers": ["None"], "incorrect_answers": ["None"]})
    return records


ULTRAFEEDBACK_KEYS = {"prompt_key": "instruction", "completion_text_key": "response",
                      "completion_score_key": "overall_score"}


def test_ultrafeedback_records_train_through_the_config_mapping(trainer):
    expected = evaluate(trainer, LISTS)
    assert evaluate(trainer, ultrafeedback_layout(LISTS), **ULTRAFEEDBACK_KEYS) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match=r"record 0, field 'completions'\[0\]: .*completion_text_key='response'"):
        evaluate(trainer, ultrafeedback_layout(LISTS), prompt_key="instruction")


def test_config_mapping_needs_a_text_key_beside_a_score_key(tmp_path):
    with pytest.raises(ValueError, match="needs completion_text_key"):
        PlackettLuceDPOConfig(**common_args(tmp_path, completion_score_key="overall_score"))
    config = PlackettLuceDPOConfig(str(tmp_path), use_cpu=True, **ULTRAFEEDBACK_KEYS)
    assert config.output_dir == str(tmp_path) and config.completion_text_key == "response"


@pytest.mark.parametrize(
    "train, evaluation, message",
    [
        ([], None, r"train dataset is empty"),
        (PAIRS, [], r"eval dataset is empty"),
        ([{"prompt": "x" * 70, "completions": ["a", "b"]}] * 8, None,
         r"train dataset: every one of the 8 lists has a prompt that alone fills max_length=64"),
    ],
)
def test_empty_or_fully_dropped_datasets_fail_before_training(model_path, tmp_path, train, evaluation, message):
    with pytest.raises(ValueError, match=message):
        PlackettLuceDPOTrainer(
            model=model_path, ref_model=tiny_causal_lm(seed=1), args=PlackettLuceDPOConfig(**common_args(tmp_path)),
            train_dataset=Dataset.from_list(train),
            eval_dataset=None if evaluation is None else Dataset.from_list(evaluation),
            processing_class=tiny_tokenizer(),
        )


def defined_here(module) -> set[str]:
    """Names of the classes and functions `module` defines (not imports)."""
    return {name for name, obj in vars(module).items()
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__}


def test_each_trainer_module_holds_one_trainer_and_the_shared_helpers_their_own_module():
    assert defined_here(kway_dpo) == {"PlackettLuceDPOConfig", "PlackettLuceDPOTrainer"}
    assert defined_here(kway_reward) == {"PlackettLuceRewardConfig", "PlackettLuceRewardTrainer"}
    shared = {"RankedDataArguments", "ranked_trainer_setup", "prepare_ranked_for_trainer", "ranked_collator",
              "tokenizer_for", "ranking_depth", "ranking_stats", "best_and_rest_mean", "gather_lists", "ratio"}
    assert shared <= defined_here(kway_common)
    for name in ("PlackettLuceDPOConfig", "PlackettLuceDPOTrainer", "PlackettLuceRewardConfig",
                 "PlackettLuceRewardTrainer"):
        assert getattr(rlhf_ext, name) is getattr(rlhf_ext.trainers, name)
