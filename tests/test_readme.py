"""Every ```python block of README.md runs as written (each in a fresh interpreter)."""
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    for package in ("transformers", "lightning"):  # optional extras: skip their examples without them
        if f"import {package}" in BLOCKS[index] or f"from {package}" in BLOCKS[index]:
            pytest.importorskip(package)
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
