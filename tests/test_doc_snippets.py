"""Every ```python block of the README and docs/ runs as written, on a CPU, offline, in a fresh process."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block of `page`."""
    text = page.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


SNIPPETS = [(page, line, code) for page in PAGES for line, code in python_blocks(page)]


@pytest.mark.parametrize("page, line, code", SNIPPETS, ids=[f"{p.name}:{n}" for p, n, _ in SNIPPETS])
def test_snippet_runs_as_written(page, line, code, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{page.name}:{line} failed:\n{result.stderr[-3000:]}"
