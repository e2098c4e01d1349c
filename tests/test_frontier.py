"""The frontier report (rlhf_ext.frontier, `rlhf-ext frontier`): each estimator against an exact computation, the
policies' KL against hand-summed log-probabilities, the command end to end on tiny models, and its up-front errors."""

import copy
import itertools
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaForSequenceClassification

from rlhf_ext import frontier
from rlhf_ext.frontier import (
    FrontierReport,
    FrontierSettings,
    best_of_n_expectation,
    best_of_n_kl,
    best_of_n_sizes,
    frontier_report,
    kl_regularised_optimum,
    plot_frontier,
    policy_point,
)
from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.models.scoring import mark_last_real_token_scoring
from rlhf_ext.scripts.cli import main as cli
from rlhf_ext.testing import (
    fraction_of_a,
    randomize_lora,
    save_tiny_model,
    tiny_causal_lm,
    tiny_llama_config,
    tiny_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)


def completion_lengths(prompts, completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


def perturbed(model, seed: int, scale: float):
    """A copy of `model` with Gaussian noise of std `scale` added to every weight."""
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


# -- best of n ---------------------------------------------------------------------------------------------------------


def test_best_of_n_expectation_is_the_average_over_every_subset_of_n():
    generator = torch.Generator().manual_seed(0)
    proxy = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    gold = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    for n in range(1, 8):
        per_prompt = []
        for p in range(3):
            subsets = list(itertools.combinations(range(7), n))
            best = [max(subset, key=lambda j: proxy[p, j]) for subset in subsets]
            per_prompt.append(sum(float(gold[p, j]) for j in best) / len(subsets))
        assert best_of_n_expectation(proxy, gold, n) == pytest.approx(sum(per_prompt) / 3, abs=1e-12), n


def test_best_of_n_of_the_proxy_itself_is_the_expected_maximum():
    proxy = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    # subsets of 2: {3,1} {3,2} {1,2} -> maxima 3, 3, 2
    assert best_of_n_expectation(proxy, proxy, 2) == pytest.approx(8 / 3)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_analytic_best_of_n_kl_is_the_kl_over_many_equally_likely_outcomes(n):
    outcomes = 10**6  # uniform reference over distinct outcomes ranked by reward
    rank = torch.arange(1, outcomes + 1, dtype=torch.float64)
    best_of_n = (rank / outcomes) ** n - ((rank - 1) / outcomes) ** n  # P(the best of n has this rank)
    exact = float(torch.special.xlogy(best_of_n, best_of_n * outcomes).sum())
    assert best_of_n_kl(n) == pytest.approx(exact, abs=1e-6)
    assert exact <= best_of_n_kl(n) + 1e-12  # and a bound on a finite set


def test_best_of_n_sizes_are_powers_of_two_up_to_the_largest():
    assert best_of_n_sizes(16) == [1, 2, 4, 8, 16]
    assert best_of_n_sizes(12) == [1, 2, 4, 8, 12]
    assert best_of_n_sizes(1) == [1]


# -- the KL-regularised optimum ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_kl_regularised_optimum_matches_the_closed_form_on_a_categorical(beta):
    """Four outcomes: pi* = p exp(r / beta) / Z and its KL, gold and proxy in closed form; the estimate from M samples
    of p is within 5 standard deviations of its delta-method error (SNIS bias is O(1/M), far smaller)."""
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    r = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    g = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    optimum = p * torch.exp(r / beta)
    optimum = optimum / optimum.sum()
    exact = {
        "kl": float((optimum * torch.log(optimum / p)).sum()),
        "gold": float((optimum * g).sum()),
        "proxy": float((optimum * r).sum()),
    }
    w = optimum / p  # the importance weight, normalised
    influence = {
        "gold": w * (g - exact["gold"]),
        "proxy": w * (r - exact["proxy"]),
        "kl": w * (r - exact["proxy"]) / beta - (w - 1),  # of  E_w[r] / beta - log mean(exp(r / beta))
    }
    samples = 200_000
    drawn = torch.multinomial(p, samples, replacement=True, generator=torch.Generator().manual_seed(1))
    point = kl_regularised_optimum(r[drawn], g[drawn], beta)
    for name, value in exact.items():
        stderr = math.sqrt(float((p * influence[name] ** 2).sum()) / samples)
        assert abs(getattr(point, name) - value) < 5 * stderr, (name, getattr(point, name), value, stderr)
    assert point.reliable  # KL far below log M


def test_the_optimum_kl_stops_at_log_m_and_is_flagged_near_it():
    proxy = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    gold = torch.tensor([[5.0, 6.0, 7.0, -1.0]])
    greedy = kl_regularised_optimum(proxy, gold, beta=1e-3)  # all the weight on the proxy's best sample
    assert greedy.kl == pytest.approx(math.log(4)) and greedy.gold == pytest.approx(-1.0)
    assert greedy.effective_samples == pytest.approx(1.0) and not greedy.reliable
    flat = kl_regularised_optimum(torch.rand(2, 64), torch.rand(2, 64), beta=1e6)  # the reference itself
    assert flat.kl == pytest.approx(0.0, abs=1e-9) and flat.reliable


# -- a policy's point ------------------------------------------------------------------------------------------------


SETTINGS = FrontierSettings(num_samples=1, best_of_n=1, policy_samples=4, max_new_tokens=6, batch_size=8, seed=0)
TEXT_PROMPTS = ["abc", "hello there", "xy"]
CHAT_PROMPTS = [[{"role": "user", "content": text}] for text in TEXT_PROMPTS]


@pytest.fixture(scope="module")
def reference():
    return tiny_causal_lm(seed=0).eval()


def test_a_policy_with_the_reference_weights_has_kl_exactly_zero(reference):
    point = policy_point(copy.deepcopy(reference), reference, tiny_tokenizer(), TEXT_PROMPTS,
                         gold=completion_lengths, proxy=fraction_of_a, settings=SETTINGS)  # fmt: skip
    assert point.kl == 0.0 and set(point.samples.log_ratios) == {0.0}
    assert point.num_completions == len(TEXT_PROMPTS) * SETTINGS.policy_samples


def test_a_completion_counts_its_tokens_through_the_first_eos_only():
    eos = 2
    completions = torch.tensor([[5, eos, 7, eos], [5, 6, 7, 8], [eos, 0, 0, 0]])
    expected = [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    assert frontier.through_first_eos(completions, eos).tolist() == expected


def hand_log_prob_sum(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """sum_t log model(y_t | x, y_<t), one unpadded sequence at a time."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    return float(torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(completion_ids)[:, None]).sum())


@pytest.mark.parametrize("prompts", [TEXT_PROMPTS, CHAT_PROMPTS], ids=["text", "chat"])
def test_a_perturbed_policy_has_the_kl_of_its_hand_summed_log_probs(reference, prompts):
    tokenizer = tiny_tokenizer()
    policy = perturbed(reference, seed=1, scale=0.05)
    point = policy_point(policy, reference, tokenizer, prompts, gold=completion_lengths, proxy=fraction_of_a,
                         settings=SETTINGS)  # fmt: skip
    samples = point.samples
    hand = []
    for k, completion_ids in enumerate(samples.completion_ids):
        prompt = prompts[samples.prompt_index[k]]
        if isinstance(prompt, str):
            prompt_ids = tokenizer(prompt)["input_ids"]
        else:
            prompt_ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)[
                "input_ids"])  # fmt: skip
        hand.append(hand_log_prob_sum(policy, prompt_ids, completion_ids)
                    - hand_log_prob_sum(reference, prompt_ids, completion_ids))  # fmt: skip
    assert samples.log_ratios == pytest.approx(hand, abs=1e-4)
    assert point.kl == pytest.approx(sum(hand) / len(hand), abs=1e-5) and point.kl > 0
    assert point.gold == pytest.approx(sum(completion_lengths(None, samples.completions)) / len(hand))
    if prompts is CHAT_PROMPTS:  # completions reach the rewards as TRL passes them: assistant messages
        assert samples.completions[0][0]["role"] == "assistant"


# -- the command, end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A tiny reference, a fully fine-tuned policy, a PPO output folder (policy/ adapter), a reward role folder and a
    prompts file with an extra column, all on disk."""
    root = tmp_path_factory.mktemp("frontier")
    reference = save_tiny_model(root / "reference", seed=0)
    perturbed(tiny_causal_lm(seed=0), seed=2, scale=0.05).save_pretrained(root / "sft")
    tiny_tokenizer().save_pretrained(root / "sft")
    shared = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA))
    randomize_lora(shared.peft_model, "policy", seed=3, scale=0.2)
    randomize_lora(shared.peft_model, "value", seed=4, scale=0.2)
    shared.save_role("policy", root / "ppo" / "policy")
    tiny_tokenizer().save_pretrained(root / "ppo" / "policy")
    save_adapter_with_head(shared.peft_model, "value", shared.heads["value"], root / "reward", "reward")
    records = [
        {"prompt": "abc", "letters": "ab"},
        {"prompt": "hello", "letters": "el"},
        {"prompt": "xy", "letters": "x"},
    ]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "reference": reference, "sft": str(root / "sft"), "ppo": str(root / "ppo"),
            "proxy": str(root / "reward"), "prompts": str(root / "prompts.jsonl")}  # fmt: skip


def frontier_argv(files, output_dir, **overrides) -> list[str]:
    flags = {
        "reference": files["reference"], "policies": [f"sft={files['sft']}", f"ppo={files['ppo']}"],
        "prompts": files["prompts"], "proxy": files["proxy"], "gold": "frontier_rewards:share_of_letters",
        "num_samples": 4, "best_of_n": 4, "betas": [1.0, 0.1], "policy_samples": 2, "max_new_tokens": 5, "seed": 3,
        "output_dir": str(output_dir), **overrides,
    }  # fmt: skip
    argv = ["frontier"]
    for name, value in flags.items():
        if value != []:  # no --policies: the reference and its estimates only
            argv += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def test_the_command_writes_the_report_and_the_plot_and_a_seed_repeats_it(run_files, tmp_path):
    assert cli(frontier_argv(run_files, tmp_path / "a")) == 0
    report = json.loads((tmp_path / "a" / "frontier.json").read_text())
    assert (tmp_path / "a" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["sources"]["gold"] == "frontier_rewards:share_of_letters"
    assert report["num_prompts"] == 3 and report["kl_cap"] == pytest.approx(math.log(4))
    assert [p["n"] for p in report["best_of_n"]] == [1, 2, 4]
    assert [p["kl"] for p in report["best_of_n"]] == pytest.approx([best_of_n_kl(n) for n in (1, 2, 4)])
    assert report["best_of_n"][0]["gold"] == pytest.approx(report["reference"]["gold"])  # best of 1 = the reference
    assert [p["beta"] for p in report["kl_regularised_optimum"]] == [1.0, 0.1]
    assert all(p["kl"] <= report["kl_cap"] + 1e-9 for p in report["kl_regularised_optimum"])
    assert report["reference"]["kl"] == 0.0 and report["reference"]["num_completions"] == 12
    policies = {p["label"]: p for p in report["policies"]}
    assert list(policies) == ["sft", "ppo"] and all(p["num_completions"] == 6 for p in policies.values())
    # a Monte-Carlo estimate from 6 completions: not 0 (the policies differ from the reference), not always > 0
    assert all(p["kl"] != 0.0 and math.isfinite(p["kl"]) and 0 <= p["gold"] <= 1 for p in policies.values())
    assert set(report["settings"]) >= {"num_samples", "best_of_n", "betas", "policy_samples", "max_new_tokens", "seed"}

    assert cli(frontier_argv(run_files, tmp_path / "b")) == 0
    assert (tmp_path / "b" / "frontier.json").read_text() == (tmp_path / "a" / "frontier.json").read_text()

    # the saved report loads back as the report that wrote it (to redraw its plot without sampling again)
    loaded = FrontierReport.load_json(tmp_path / "a" / "frontier.json")
    assert loaded.to_dict() == report
    assert plot_frontier(loaded, tmp_path / "redrawn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # another JSON file, or a report with a field missing, is refused naming the file
    for name, text in (("other.json", '{"policies": []}'), ("broken.json", "{")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name} is not a frontier report"):
            FrontierReport.load_json(tmp_path / name)


def test_a_reward_function_can_be_the_proxy(run_files, tmp_path):
    proxy = "frontier_rewards:share_of_letters"  # the gold itself: best of n then scores what it ranks by
    assert cli(frontier_argv(run_files, tmp_path, proxy=proxy, policies=[])) == 0
    report = json.loads((tmp_path / "frontier.json").read_text())
    assert report["sources"]["proxy"] == proxy and report["policies"] == []
    assert [p["gold"] for p in report["best_of_n"]] == [p["proxy"] for p in report["best_of_n"]]


def saved_classifier(folder, scored_at_last_real_token: bool) -> str:
    """A tiny sequence classifier with one label, saved with the tiny tokenizer; marked as the K-way reward trainer
    marks the full models it saves, or not (one from elsewhere)."""
    torch.manual_seed(5)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=1))
    if scored_at_last_real_token:
        mark_last_real_token_scoring(model)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_a_reward_model_the_reward_trainer_saved_scores_prompt_completion_and_eos(run_files, tmp_path):
    proxy = saved_classifier(tmp_path / "classifier", scored_at_last_real_token=True)
    settings = FrontierSettings(num_samples=2, best_of_n=2, max_new_tokens=4)
    report = frontier_report(run_files["reference"], {}, ["abc", "hello"], gold=completion_lengths, proxy=proxy,
                             settings=settings)  # fmt: skip
    classifier, tokenizer = LlamaForSequenceClassification.from_pretrained(proxy).eval(), tiny_tokenizer()
    samples = report.reference.samples
    for k, completion in enumerate(samples.completions):
        text = ["abc", "hello"][samples.prompt_index[k]] + completion + tokenizer.eos_token
        with torch.no_grad():  # one unpadded sequence ends in the EOS: the last token is the one scored
            expected = classifier(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits[0, 0]
        assert samples.proxy[k] == pytest.approx(float(expected), abs=1e-5)


def test_a_ppo_output_folder_and_its_checkpoint_are_policies(run_files, tmp_path):
    """The PPO recipe writes the policy to <output_dir>/policy and to checkpoint-<step>/policy; the last step's
    checkpoint holds the final adapter, so both get the same point."""
    out, prompts = tmp_path / "ppo", tmp_path / "train.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["abc", "hello", "xy", "qrs"] * 4))
    recipe_config = str(ROOT / "recipes" / "configs" / "ppo.yaml")
    cli(["ppo", "--config", recipe_config, "--model_name_or_path", run_files["reference"], "--output_dir", str(out),
         "--reward_adapter_path", run_files["proxy"], "--dataset_name", str(prompts), "--lora_r", "4",
         "--lora_alpha", "8", "--per_device_train_batch_size", "4", "--steps_per_generation", "1",
         "--max_completion_length", "4", "--max_steps", "2", "--num_ppo_epochs", "1", "--learning_rate", "1e-2",
         "--use_cpu", "true", "--save_strategy", "steps", "--save_steps", "1", "--disable_tqdm", "true"])  # fmt: skip
    policies = [f"final={out}", f"step2={out / 'checkpoint-2'}"]
    # a checkpoint's policy records its base, as a role folder does, so it loads with the base check and no warning
    assert (out / "checkpoint-2" / "policy" / "base_fingerprint.json").is_file()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*does not record the base")
        assert cli(frontier_argv(run_files, tmp_path / "report", policies=policies)) == 0
    final, step2 = json.loads((tmp_path / "report" / "frontier.json").read_text())["policies"]
    assert final == {**step2, "label": "final", "source": str(out)} and final["kl"] != 0.0


# -- errors before any work --------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(frontier, "load_causal_lm", refuse)


@pytest.fixture(scope="module")
def other_vocabulary(run_files):
    """A policy folder whose tokenizer has one token more than the reference's."""
    folder = run_files["root"] / "other_vocabulary"
    tiny_causal_lm(seed=0).save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def empty_prompts(run_files):
    path = run_files["root"] / "empty.jsonl"
    path.write_text("")
    return str(path)


BAD_INPUTS = {
    "missing reference": (dict(reference="./no/such/model"), FileNotFoundError, "--reference ./no/such/model: no such"),
    "missing policy": (
        dict(policies=["x=./no/such/policy"]),
        FileNotFoundError,
        "--policies x=./no/such/policy: no such",
    ),
    "gold without a colon": (dict(gold="frontier_rewards"), ValueError, "expected module:function"),
    "gold module missing": (dict(gold="no_such_module_xyz:f"), ValueError, "cannot import module 'no_such_module_xyz'"),
    "gold attribute missing": (dict(gold="frontier_rewards:nothing"), ValueError, "has no attribute 'nothing'"),
    "gold not callable": (dict(gold="frontier_rewards:NOT_A_FUNCTION"), ValueError, "is a int, not a function"),
    "fewer samples than n": (dict(num_samples=2), ValueError, "--num_samples 2 is smaller than --best_of_n 4"),
    "no prompts": (dict(max_prompts=0), ValueError, "leaves no prompts"),
    "empty prompts file": (dict(prompts="{empty}"), ValueError, "holds no records"),
    "other vocabulary": (dict(policies=["odd={other}"]), ValueError, "vocabulary differs from the reference's"),
    "causal LM as the proxy": (dict(proxy="{reference}"), ValueError, "not a sequence-classification reward model"),
    "classifier from elsewhere": (dict(proxy="{classifier}"), ValueError, "rlhf_ext's reward trainer did not save"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_any_model_loads(case, run_files, other_vocabulary, empty_prompts, tmp_path,
                                                     no_model_loads):  # fmt: skip
    overrides, error, message = BAD_INPUTS[case]
    paths = {"empty": empty_prompts, "other": other_vocabulary, "reference": run_files["reference"]}
    if "{classifier}" in overrides.get("proxy", ""):
        paths["classifier"] = saved_classifier(tmp_path / "classifier", scored_at_last_real_token=False)

    def filled(value):  # the fixtures' paths in place of their {names}
        if isinstance(value, list):
            return [filled(v) for v in value]
        return value.format(**paths) if isinstance(value, str) else value

    with pytest.raises(error, match=re.escape(message)):
        cli(frontier_argv(run_files, tmp_path, **{name: filled(value) for name, value in overrides.items()}))
    assert not (tmp_path / "frontier.json").exists()


def test_best_of_n_at_interpolates_linearly_in_kl_and_stops_at_the_largest_n():
    measured = ((1, 0.1), (2, 0.3), (4, 0.4))
    points = [frontier.BestOfNPoint(n=n, kl=frontier.best_of_n_kl(n), gold=g, proxy=0.0) for n, g in measured]
    middle = (points[1].kl + points[2].kl) / 2
    assert frontier.best_of_n_at(points, 0.0) == pytest.approx(0.1)
    assert frontier.best_of_n_at(points, -0.01) == pytest.approx(0.1)  # a Monte-Carlo KL just below 0
    assert frontier.best_of_n_at(points, middle) == pytest.approx(0.35)
    assert frontier.best_of_n_at(points, points[2].kl) == pytest.approx(0.4)
    assert frontier.best_of_n_at(points, points[2].kl + 1e-6) is None


def test_checkpoints_labelled_run_at_step_form_one_series_in_order():
    def point(label):
        return frontier.PolicyPoint(label=label, kl=0.0, kl_stderr=0.0, gold=0.0, gold_stderr=0.0, proxy=0.0,
                                    proxy_stderr=0.0, num_completions=1)  # fmt: skip

    series = frontier.policy_series([point("PPO@8"), point("DPO"), point("PPO@16")])
    assert {name: [p.label for p in points] for name, points in series.items()} == {
        "PPO": ["PPO@8", "PPO@16"], "DPO": ["DPO"]
    }
