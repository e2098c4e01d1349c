"""The CI variant of the demo: every stage of the demo (demo/__main__.py) on a tiny random model, and a cached rerun."""

import json
from pathlib import Path

import pytest
from scripts import load_recipe
from trl import TrlParser

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sample", "reward", "ppo", "dpo", "eval")


@pytest.fixture(scope="module")
def demo():
    return load_recipe("demo")


@pytest.fixture(scope="module")
def tiny_run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_tiny")
    args = ["--config", str(ROOT / "recipes" / "configs" / "demo_tiny.yaml"), "--output_dir", str(out)]
    (config,) = TrlParser(demo.DemoConfig).parse_args_and_config(args)
    return config, demo.main(config)


def test_every_stage_writes_its_outputs(tiny_run):
    config, metrics = tiny_run
    out = Path(config.output_dir)
    assert set(metrics["timings_s"]) == {"base", *STAGES}
    assert (out / "ranked" / "train.jsonl").stat().st_size > 0 and (out / "ranked" / "test.jsonl").is_file()
    assert (out / "reward" / "head.safetensors").is_file() and (out / "reward" / "adapter_config.json").is_file()
    assert (out / "ppo" / "policy" / "adapter_config.json").is_file()
    assert (out / "dpo" / "adapter_config.json").is_file()
    samples = json.loads((out / "eval" / "samples.json").read_text())
    assert set(samples) == {"base", "ppo", "dpo"}
    assert all(len(s["texts"]) == config.n_heldout_prompts for s in samples.values())


def test_metrics_json_and_report_render(tiny_run):
    config, metrics = tiny_run
    out = Path(config.output_dir)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert set(metrics["policies"]) == {"base", "ppo", "dpo"}
    assert metrics["policies"]["base"]["win_rate_vs_base"] == 0.5
    assert 0 <= metrics["reward"]["heldout_top1_accuracy"] <= 1
    report = (out / "report.md").read_text()
    for needle in ("| base |", "| PPO |", "| K-way DPO |", "not from people", "plots/comparison.png",
                   "plots/ppo.png", "plots/dpo.png", "Sample completions on held-out prompts"):  # fmt: skip
        assert needle in report
    for plot in ("comparison", "ppo", "dpo"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_reuses_every_cached_stage(demo, tiny_run, monkeypatch):
    config, metrics = tiny_run

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached stage ran again")

    monkeypatch.setattr(demo, "build_ranked_dataset", must_not_run)
    monkeypatch.setattr(demo, "run_recipe", must_not_run)
    monkeypatch.setattr(demo, "evaluate_policies", must_not_run)
    rerun = demo.main(config)
    assert rerun["policies"] == metrics["policies"] and rerun["timings_s"] == metrics["timings_s"]


class StageRan(Exception):
    pass


def test_a_changed_setting_reruns_its_stage(demo, tiny_run, monkeypatch):
    config, _ = tiny_run

    def sampled_with(*args, **kwargs):
        raise StageRan(kwargs["k"])

    monkeypatch.setattr(demo, "build_ranked_dataset", sampled_with)
    with pytest.raises(StageRan, match=str(config.k + 1)):
        demo.main(type(config)(**{**vars(config), "k": config.k + 1}))


def test_frontier_draws_every_checkpoint_of_ppo_dpo_and_online_kway(tiny_run, monkeypatch):
    """`python -m demo.frontier` on the demo's outputs: online K-way trains, and every checkpoint of the three runs is
    a point of the frontier, with best of n and the optimum; a rerun samples nothing again."""
    import demo.frontier as demo_frontier

    config, _ = tiny_run
    out = Path(config.output_dir)
    rows = demo_frontier.main(config)["rows"]
    labels = [row["policy"] for row in rows]
    assert labels == ["reference", "PPO@1", "PPO@2", "K-way DPO@1", "K-way DPO@2", "online K-way@1", "online K-way@2"]
    report = json.loads((out / "frontier" / "frontier.json").read_text())
    assert [p["n"] for p in report["best_of_n"]] == [1, 2, 4] and len(report["kl_regularised_optimum"]) == 2
    assert report["reference"]["kl"] == 0.0 and rows[0]["versus_best_of_n"] == pytest.approx(0.0, abs=1e-12)
    assert (out / "plots" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "| online K-way@2 |" in (out / "frontier.md").read_text()

    monkeypatch.setattr(demo_frontier, "frontier_report", lambda *a, **k: pytest.fail("the cached frontier reran"))
    assert demo_frontier.main(config)["rows"] == rows


def test_a_misspelt_frontier_setting_is_named_before_any_work(tiny_run, monkeypatch):
    import demo.frontier as demo_frontier

    config, _ = tiny_run
    misspelt = type(config)(**{**vars(config), "frontier_args": {"num_sample": 8}})
    monkeypatch.setattr(demo_frontier, "run_stages", lambda cfg: pytest.fail("a stage ran before the check"))
    with pytest.raises(ValueError, match=r"frontier_args: unknown setting\(s\) \['num_sample'\].*num_samples"):
        demo_frontier.main(misspelt)
