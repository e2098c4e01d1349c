import subprocess
import sys


def test_importing_the_ops_does_not_import_trl_or_transformers():
    code = "import sys, rlhf_ext; rlhf_ext.gae; print('trl' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_docs_stand_alone_without_paths_outside_the_repository():
    import re

    for page in DOCS:
        text = page.read_text()
        assert not re.search(r"(?<![\w.])(\.\./)?shared/(seed|DESIGN|STYLE)", text), f"{page.name} cites shared/"
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative markdown links
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not in the repository"
