"""Smoke test: `dps-fast bench` runs end to end on a tiny weight set (no timing checks)."""
import json

import pytest
import torch

from dps_fast import backends, bench_cases
from dps_fast.cli import main

TINY = ["--scale", "0.0003", "--train", "1,32,2,64,2,8", "--min-reps", "1", "--max-reps", "1",
        "--warmup", "1", "--seconds", "0", "--threads", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: fast and steady on a busy machine
        assert main(["bench", *TINY, "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    return path


def test_weight_shape_is_bert_large_at_scale_one():
    assert bench_cases.weight_shape(1.0) == (24, 1024)
    assert bench_cases.BERT_LARGE_PARAMS == 24 * (12 * 1024**2 + 13 * 1024)
    layers, dim = bench_cases.weight_shape(bench_cases.scale_for_params(1_000_000))
    assert layers == 1 and abs(bench_cases.layer_params(dim) - 1_000_000) < 100_000


def test_bench_cli_writes_every_row(bench_json):
    rows = json.loads(bench_json.read_text())["rows"]
    assert rows and not [r for r in rows if "error" in r]
    methods = {r["method"] for r in rows}
    assert {"AdamW foreach", "published DPS"} <= methods
    assert {f"dps_fast[{name}]" for name in backends.available("cpu")} <= methods
    assert {r["section"] for r in rows} == {"step", "boundary", "train"}
    assert all(r["median_s"] > 0 and r["params"] > 0 for r in rows)


def test_bench_report_and_plot_from_json(bench_json, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert main(["bench", "--from-json", str(bench_json), "--plot", str(png)]) == 0
    assert png.stat().st_size > 0
    out = capsys.readouterr().out
    assert "Ratios" in out and "copy bandwidth" in out
