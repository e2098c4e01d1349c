"""benchmarks/gpu_check.py at its tiny CPU size: a row per step, and imports the GPU machine can satisfy."""

import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_prints_a_row_per_step(tmp_path, capsys):
    output = tmp_path / "gpu_check.json"
    rows = gpu_check.main(["--dry_run", "--steps", "1", "--work_dir", str(tmp_path), "--output", str(output)])
    printed = capsys.readouterr().out
    for mode in gpu_check.MODES:
        for step in gpu_check.STEPS:
            assert re.search(rf"^{mode}\s+{step}\s", printed, re.MULTILINE), f"no row for {mode} {step}:\n{printed}"
    assert len(json.loads(output.read_text())["results"]) == len(rows) == 6
    for row in rows:
        if row["outcome"] == "ok":  # 4-bit rows are skipped where bitsandbytes is missing
            assert row["peak_gib"] > 0 and row["step_s"] > 0 and row["loss"] == row["loss"], row


def test_models_and_ops_import_neither_trl_nor_datasets():
    # the GPU machine has neither: gpu_check.py (and the benchmark modules it imports) must get by with
    # rlhf_ext.models and rlhf_ext.ops
    code = ("import sys, benchmarks.gpu_check, rlhf_ext.models, rlhf_ext.ops; "
            "print(sorted({'trl', 'datasets'} & set(sys.modules)))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
