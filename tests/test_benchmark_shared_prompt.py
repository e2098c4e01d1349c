"""benchmarks/shared_prompt.py's trl-all-pairs variant runs TRL's DPOTrainer on every known pair of every list, and
benchmarks/kway_vs_pairs.py scores held-out rankings as its docstring says (the shared-prompt accuracy check)."""

import itertools

import pytest

from benchmarks import shared_prompt
from benchmarks.kway_vs_pairs import ranking_accuracy


def test_all_pairs_keeps_the_known_order_only():
    lists = [{"prompt_ids": [9], "completion_ids": [[1], [2], [3]], "num_ranked": 2},
             {"prompt_ids": [8], "completion_ids": [[4], [5], [6]], "num_ranked": 1}]  # fmt: skip
    pairs = shared_prompt.all_pairs(lists)  # num_ranked 2 of 3: every pair; 1 of 3: the best over each other only
    assert [(p["prompt_ids"][0], p["chosen_ids"][0], p["rejected_ids"][0]) for p in pairs] == [
        (9, 1, 2), (9, 1, 3), (9, 2, 3), (8, 4, 5), (8, 4, 6)]  # fmt: skip


def test_shared_prompt_quick_run_times_trl_on_every_pair_of_every_list(tmp_path, monkeypatch):
    # --quick at a smaller model than the benchmark's: the rows' counts, not the timings, are under test
    tiny = {**shared_prompt.QUICK_MODEL, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 4, "intermediate_size": 128, "vocab_size": 512}
    monkeypatch.setattr(shared_prompt, "QUICK_MODEL", tiny)
    k, num_lists, per_microbatch = 3, 2, 4
    rows = shared_prompt.main(["--quick", "--ks", str(k), "--lists_per_step", str(num_lists), "--variants", "today",
                               "shared+packed", "trl-all-pairs", "--pairs_per_microbatch", str(per_microbatch),
                               "--output", str(tmp_path / "r.json")])  # fmt: skip
    today, packed, trl = rows
    assert [row["variant"] for row in rows] == ["today", "shared+packed", "trl-all-pairs"]

    # the same lists, drawn again: every (better, worse) pair is a chosen and a rejected row of prompt + completion
    lists = shared_prompt.ranked_lists("UltraFeedback", k, num_lists, seed=0, scale=0.5, vocab=tiny["vocab_size"])
    pairs = [(len(item["prompt_ids"]), len(item["completion_ids"][i]), len(item["completion_ids"][j]))
             for item in lists for i, j in itertools.combinations(range(k), 2)]  # fmt: skip
    assert trl["pairs"] == len(pairs) == num_lists * k * (k - 1) // 2
    assert trl["sequences"] == num_lists * k * (k - 1) and today["sequences"] == num_lists * k
    assert trl["microbatches"] == -(-len(pairs) // per_microbatch)
    assert trl["tokens"] == sum(2 * prompt + chosen + rejected for prompt, chosen, rejected in pairs)
    assert today["tokens"] == sum(k * len(item["prompt_ids"]) + sum(map(len, item["completion_ids"])) for item in lists)
    assert trl["positions"] >= trl["tokens"] and len(trl["microbatch_cpu_s"][0]) == trl["microbatches"]

    assert trl["cpu_s"] == pytest.approx(sum(trl["microbatch_cpu_s"][0]))  # one repeat: the step is their sum
    for row in rows:
        assert row["speedup_vs_trl_cpu"] == pytest.approx(trl["cpu_s"] / row["cpu_s"])
        assert row["speedup_cpu"] == pytest.approx(today["cpu_s"] / row["cpu_s"])
    assert packed["tokens"] < today["tokens"] < trl["tokens"]  # each prompt once < once per completion < per pair row


def test_ranking_accuracy_counts_a_tie_as_half_and_top1_as_strictly_first():
    # best first: [3, 1, 2] gets (0, 1) and (0, 2) right and (1, 2) wrong; [1, 1] is a tie at the top
    assert ranking_accuracy([[3.0, 1.0, 2.0], [1.0, 1.0]]) == (pytest.approx((2 + 0.5) / 4), 0.5)
