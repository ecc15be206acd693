"""`make sanitize` runs the cpu-backend, parity and crash-safety tests on the CPU
module built with AddressSanitizer and UndefinedBehaviorSanitizer. These tests
make sure that run is what it claims: the sanitized module is the one loaded,
and the sanitizer catches a read past a buffer (handed to the raw kernel, past
the checks of dps_fast.param_state). They skip in a plain `make test`."""
import os
import subprocess
import sys

import pytest

SANITIZED = os.environ.get("DPS_FAST_CPU_KERNELS")
pytestmark = pytest.mark.skipif(not SANITIZED, reason="only under `make sanitize` (DPS_FAST_CPU_KERNELS unset)")

OVERFLOW = """
import torch
from dps_fast.backends import cpu
n = 4096
p, g, m, v = (torch.zeros(n) for _ in range(4))
bits = torch.zeros(8, dtype=torch.uint8)  # 8 bytes for 4096 entries: the kernel reads 504 past the end
address = lambda t: t.data_ptr()
cpu._kernels.update(2, 0, 0, False, [address(p)], [address(g)], [address(m)], [address(v)], [], [address(bits)], [n],
                    [1], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, 0, 0, 1)
print("no finding")
"""


def test_the_sanitized_module_is_loaded():
    from dps_fast.backends import cpu

    assert cpu._kernels is not None and os.path.samefile(cpu._kernels.__file__, SANITIZED)
    assert "libasan" in os.environ.get("LD_PRELOAD", "")


def test_the_sanitizer_catches_a_read_past_a_buffer():
    done = subprocess.run([sys.executable, "-c", OVERFLOW], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no finding" not in done.stdout
    assert "heap-buffer-overflow" in done.stderr, done.stderr[-3000:]
