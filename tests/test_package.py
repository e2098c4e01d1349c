import subprocess
import sys


def test_importing_the_ops_does_not_import_trl_or_transformers():
    code = "import sys, rlhf_ext; rlhf_ext.gae; print('trl' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
