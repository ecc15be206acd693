"""The build: the CPU module exists where it can be built, its hot loops are
vectorised for each instruction set, and no compiled module depends on torch
(or, for CUDA, on a shared cudart)."""
import importlib
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _built(name):
    try:
        return importlib.import_module(f"dps_fast.{name}")
    except ImportError:
        return None


def _cmake():
    if shutil.which("cmake"):
        return True
    return importlib.util.find_spec("cmake") is not None


@pytest.mark.skipif(not (_cmake() and (shutil.which("c++") or shutil.which("g++"))),
                    reason="no cmake or C++ compiler: the pure-PyTorch fallback is expected")
def test_cpu_module_is_built():
    assert _built("_cpu_kernels") is not None, (
        "cmake and a C++ compiler are here but dps_fast._cpu_kernels is not built; "
        "reinstall with `pip install -v -e .` and read the dps_fast warnings")


def test_sources_include_no_torch_header():
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix in (".h", ".cpp", ".cu"):
            assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", path.read_text()), path


def _objdump(module):
    if module is None or not shutil.which("objdump"):
        pytest.skip("module not built, or no objdump")
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", module.__file__], capture_output=True,
                          text=True, check=True).stdout


def test_update_loops_are_vectorised_for_each_instruction_set():
    """Each instruction set's AdamW loop takes packed square roots of its full width."""
    module = _built("_cpu_kernels")
    if module is not None and module.runnable_isas() == ["base"] and os.uname().machine != "x86_64":
        pytest.skip("not an x86-64 build")
    code = _objdump(module)
    assert re.search(r"\bvsqrtps\s+%zmm", code), "AVX-512 kernels not vectorised at 512 bits"
    assert re.search(r"\bvsqrtps\s+%ymm", code), "AVX2 kernels not vectorised at 256 bits"
    assert re.search(r"\bsqrtps\s+%xmm", code), "baseline kernels not vectorised (SSE)"


def _needed(path):
    if not shutil.which("readelf"):
        pytest.skip("no readelf")
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@pytest.mark.parametrize("name", ["_cpu_kernels", "_cuda_kernels"])
def test_modules_need_no_torch_and_no_shared_cudart(name):
    module = _built(name)
    if module is None:
        pytest.skip(f"{name} not built")
    needed = _needed(module.__file__)
    assert not [lib for lib in needed if re.match(r"lib(torch|c10|cudart|cuda)\b", lib)], needed
