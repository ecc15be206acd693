"""pytest-benchmark suite over the cases of `dps-fast bench` (dps_fast/bench/cases.py):
optimizer steps, stage-boundary selection and whole training steps for torch
AdamW, published-style DPS and every dps_fast backend available here.

    pytest benchmarks/ --benchmark-only

Not part of `make test` (pytest's testpaths is tests/). Environment:
DPS_BENCH_SCALE (weight set as a fraction of BERT-large's encoder; default
as `dps-fast bench`: 1/24 = one BERT-large layer on CPU, 1.0 on CUDA),
DPS_BENCH_DEVICES (comma-separated; default cpu, and cuda when available),
DPS_BENCH_ROUNDS (timed rounds per case, default 7). Each case's extra_info
holds the bytes model of one call (bytes), so GB/s = bytes / time.
"""
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from dps_fast.bench import cases as bench_cases  # noqa: E402
from dps_fast.bench.weights import DEFAULT_SCALE, Workload  # noqa: E402

DEVICES = [d for d in os.environ.get(
    "DPS_BENCH_DEVICES", "cpu" + (",cuda" if torch.cuda.is_available() else "")).split(",") if d]
ROUNDS = int(os.environ.get("DPS_BENCH_ROUNDS", "7"))
CASES = [case for device in DEVICES for case in bench_cases.cases(device)]


@pytest.fixture(scope="module")
def workloads():
    """One Workload per device, built on first use and shared by its cases."""
    built = {}

    def get(device):
        if device not in built:
            scale = os.environ.get("DPS_BENCH_SCALE")
            scale = float(scale) if scale else DEFAULT_SCALE.get(torch.device(device).type, 1.0)
            built[device] = Workload(device, scale)
        return built[device]

    yield get
    built.clear()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_throughput(benchmark, case, workloads):
    device = torch.device(case.device)
    prepared = bench_cases.prepare(case, workloads(case.device))

    def call():
        prepared.run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.group = f"{case.device} {case.section}"
    benchmark.extra_info.update(entries=prepared.timed_params, bytes=prepared.bytes_moved,
                                state_bytes_per_param=(prepared.state_bytes / prepared.model_params
                                                       if prepared.state_bytes is not None else None))
    try:
        benchmark.pedantic(call, setup=prepared.setup, rounds=ROUNDS, warmup_rounds=2)
    finally:
        if prepared.close is not None:
            prepared.close()
