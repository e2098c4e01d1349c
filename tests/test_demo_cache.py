from demo.cache import is_done, mark_done, read_summary


def test_stage_is_done_only_with_the_same_config(tmp_path):
    marker = tmp_path / ".stages" / "sample.json"
    config = {"k": 4, "prompts": ["a", "b"], "path": tmp_path}
    assert not is_done(marker, config)
    mark_done(marker, config, {"n_written": 2})
    assert is_done(marker, {"path": tmp_path, "prompts": ["a", "b"], "k": 4})  # key order does not matter
    assert not is_done(marker, {**config, "k": 5})
    assert read_summary(marker) == {"n_written": 2}
