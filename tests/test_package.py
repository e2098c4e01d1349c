import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


def test_importing_the_ops_does_not_import_trl_or_transformers():
    code = "import sys, rlhf_ext; rlhf_ext.gae; print('trl' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_docs_stand_alone_without_paths_outside_the_repository():
    for page in DOCS:
        text = page.read_text()
        assert not re.search(r"(?<![\w.])(\.\./)?shared/(seed|DESIGN|STYLE)", text), f"{page.name} cites shared/"
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative markdown links
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not in the repository"


@pytest.mark.slow
def test_wheel_builds_passes_twine_check_and_imports_in_a_fresh_venv(tmp_path):
    """`python -m build` + `twine check` + a fresh venv with the CPU torch: the package and its data files import."""
    pytest.importorskip("build")
    pytest.importorskip("twine")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(REPO)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("rlhf_ext-*.whl"))
    with zipfile.ZipFile(wheel) as archive:  # the demo, the benchmarks and the tests stay in the repository
        assert all(name.startswith("rlhf_ext") for name in archive.namelist()), archive.namelist()
    subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, str(wheel)], check=True)
    code = "import rlhf_ext, rlhf_ext.memory, rlhf_ext.scripts.cli; rlhf_ext.PPOTrainer"
    subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, cwd=tmp_path)
