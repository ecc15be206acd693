"""Crash safety of the fast backends: every case of hardening_cases.py, once per fast
backend that runs on CPU tensors here (the Triton one through its interpreter), each in
its own subprocess with a time limit, so that a segfault, an abort or a hang fails
one test instead of killing the suite."""
import importlib.util
import os
import subprocess
import sys

import pytest

from dps_fast import backends
from hardening_cases import CASES

HERE = os.path.dirname(os.path.abspath(__file__))
LIMIT = 180  # seconds; a case takes a few (most of it importing torch)


def _skip_reason(backend):
    if backend == "triton":  # run through the interpreter, which the subprocess switches on
        return None if importlib.util.find_spec("triton") else "triton is not installed"
    return backends.unavailable_reason(backend, "cpu")  # tests/test_build.py says whether it should run


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", [c.__name__ for c in CASES])
def test_case_in_a_subprocess(case, backend):
    if _skip_reason(backend):
        pytest.skip(_skip_reason(backend))
    env = dict(os.environ, TRITON_INTERPRET="1") if backend == "triton" else dict(os.environ)
    try:
        done = subprocess.run([sys.executable, os.path.join(HERE, "hardening_cases.py"), case, backend],
                              capture_output=True, text=True, timeout=LIMIT, env=env, cwd=HERE)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"{case} on {backend}: still running after {LIMIT} s (a hang)\n{expired.stderr or ''}")
    output = (done.stdout + done.stderr)[-4000:]
    if done.returncode < 0:
        pytest.fail(f"{case} on {backend}: killed by signal {-done.returncode} (a crash)\n{output}")
    assert done.returncode == 0, f"{case} on {backend}: exit {done.returncode}\n{output}"
    assert f"ok: {case} on {backend}" in done.stdout
