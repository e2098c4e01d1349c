from demo.cache import is_done, mark_done, read_summary


def test_stage_is_done_only_with_the_same_config(tmp_path):
    marker = tmp_path / ".stages" / "sample.json"
    config = {"k": 4, "prompts": ["a", "b"], "path": tmp_path}
    assert not is_done(marker, config)
    mark_done(marker, config, {"n_written": 2})
    assert is_done(marker, {"path": tmp_path, "prompts": ["a", "b"], "k": 4})  # key order does not matter
    assert not is_done(marker, {**config, "k": 5})
    assert read_summary(marker) == {"n_written": 2}


def test_a_training_stage_rerun_with_other_settings_leaves_none_of_the_previous_runs_checkpoints(tmp_path,
                                                                                                 monkeypatch):
    """A rerun that saves at other steps must not find the earlier run's checkpoint-N beside its own: the frontier
    draws every checkpoint-N of a stage as one run's curve."""
    import demo.__main__ as demo_main
    from demo.frontier import checkpoints

    def fake_recipe(name, args, stage_dir):  # saves a checkpoint every `save_steps` up to `max_steps`
        for step in range(args["save_steps"], args["max_steps"] + 1, args["save_steps"]):
            (stage_dir / f"checkpoint-{step}").mkdir()
        return []

    monkeypatch.setattr(demo_main, "run_recipe", fake_recipe)
    cfg = demo_main.DemoConfig(online_kway_args={"save_steps": 4, "max_steps": 16})
    demo_main.recipe_stage("online_kway", cfg, tmp_path, [], {}, lambda stage_dir, log: {})
    assert [step for step, _ in checkpoints(tmp_path / "online_kway")] == [4, 8, 12, 16]
    cfg = demo_main.DemoConfig(online_kway_args={"save_steps": 8, "max_steps": 32})
    demo_main.recipe_stage("online_kway", cfg, tmp_path, [], {}, lambda stage_dir, log: {})
    assert [step for step, _ in checkpoints(tmp_path / "online_kway")] == [8, 16, 24, 32]
    assert [step for step, _ in checkpoints(tmp_path / "online_kway.previous")] == [4, 8, 12, 16]  # kept aside
    # the same settings again: the stage is reused, its outputs kept
    demo_main.recipe_stage("online_kway", cfg, tmp_path, [], {}, lambda stage_dir, log: {})
    assert [step for step, _ in checkpoints(tmp_path / "online_kway")] == [8, 16, 24, 32]
