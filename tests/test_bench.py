"""`dps-fast bench`: runs end to end on a tiny weight set, survives a failing
row, keeps its JSON when stopped, renders one bytes model, and refuses bad
options as usage errors before running anything (no timing checks)."""
import json
import shlex

import pytest
import torch

from dps_fast import backends
from dps_fast.bench import bytes_model, cases, cli, report, runner, weights
from dps_fast.cli import main

TINY = ["--scale", "0.0003", "--train", "1,32,2,64,2,8", "--min-reps", "1", "--max-reps", "1",
        "--warmup", "1", "--seconds", "0", "--threads", "1", "--no-progress", "--device", "cpu"]
TIMING = dict(min_reps=1, max_reps=1, seconds=0, warmup=0)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: fast and steady on a busy machine; the memory section: test_memory_rows
        assert main(["bench", *TINY, "--sections", "step,boundary,train", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    return path


def test_weight_shape_is_bert_large_at_scale_one():
    assert weights.weight_shape(1.0) == (24, 1024)
    assert weights.BERT_LARGE_PARAMS == 24 * (12 * 1024**2 + 13 * 1024)
    layers, dim = weights.weight_shape(weights.scale_for_params(1_000_000))
    assert layers == 1 and abs(weights.layer_params(dim) - 1_000_000) < 100_000


def test_bench_cli_writes_every_row(bench_json):
    result = json.loads(bench_json.read_text())
    rows = result["rows"]
    assert rows and not [r for r in rows if "error" in r]
    assert result["meta"]["finished"] is True
    methods = {r["method"] for r in rows}
    assert {"AdamW foreach", "published DPS"} <= methods
    assert {f"dps_fast[{name}]" for name in backends.available("cpu")} <= methods
    assert {r["section"] for r in rows} == {"step", "boundary", "train"}
    assert all(r["median_s"] > 0 and r["params"] > 0 for r in rows)


def test_rows_move_the_bytes_of_the_one_model(bench_json):
    result = json.loads(bench_json.read_text())
    info = result["devices"]["cpu"]
    managed, plain = info["managed"], info["params"] - info["managed"]
    for row in result["rows"]:
        if row["section"] == "step":
            assert row["bytes"] == bytes_model.step_bytes(managed, plain, row["phase"])
        elif row["section"] == "boundary":
            assert row["bytes"] == bytes_model.select_bytes(managed)
    assert bytes_model.step_bytes(1, 0, "explore") == 36 and bytes_model.step_bytes(1, 0, "exploit") == 28.125
    # bf16 parameters and bf16 state: 2 bytes a pass; AdamW's bf16 step (its moments bf16 too) moves 14
    assert bytes_model.step_bytes(1, 0, "explore", 2, 2) == 18 and bytes_model.step_bytes(0, 1, "dense", 2, 2) == 14


def test_bench_report_and_plot_from_json(bench_json, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert main(["bench", "--from-json", str(bench_json), "--plot", str(png)]) == 0
    assert png.stat().st_size > 0
    out = capsys.readouterr().out
    assert "Ratios" in out and "copy bandwidth" in out
    assert bytes_model.describe() in out.replace("\n  ", " ")  # the notes render the model


class FakeCompilationError(Exception):
    """Like Triton's CompilationError: an Exception, not a RuntimeError."""


def test_a_failing_row_is_kept_with_its_reason_and_the_run_goes_on(monkeypatch, capsys, one_thread):
    prepare = cases.prepare

    def failing(case, workload):
        if case.backend == "torch" and case.operation == "explore":
            raise FakeCompilationError("at 12:3: cannot compile\nmore detail")
        return prepare(case, workload)

    monkeypatch.setattr(cases, "prepare", failing)
    torch.set_num_threads(1)
    seen = []
    result = runner.run_bench(["cpu"], 0.0003, ["torch"], ("step",), TIMING, progress=False,
                              on_row=lambda partial: seen.append(len(partial["rows"])))
    failed = [r for r in result["rows"] if "error" in r]
    assert [(r["method"], r["phase"]) for r in failed] == [("dps_fast[torch]", "explore")]
    assert failed[0]["error"] == "FakeCompilationError: at 12:3: cannot compile"
    assert len(result["rows"]) == len(cases.cases("cpu", ["torch"], ("step",))) > len(failed)
    assert seen[1:-1] == list(range(1, len(result["rows"]) + 1))  # handed over after every row
    log = capsys.readouterr().err.splitlines()  # --no-progress: a line per row, the device's first
    assert len([line for line in log if line.startswith("bench [")]) == len(result["rows"]) + 1
    assert any("dps_fast[torch] explore: FAILED (FakeCompilationError" in line for line in log)


def test_a_stopped_run_leaves_its_json(monkeypatch, tmp_path, capsys, one_thread):
    prepare = cases.prepare

    def interrupted(case, workload):
        if case.method == "published DPS":
            raise KeyboardInterrupt  # e.g. the time limit of gpu_check.sh (SIGINT)
        return prepare(case, workload)

    monkeypatch.setattr(cases, "prepare", interrupted)
    path = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", *TINY, "--sections", "step", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["meta"]["finished"] is False
    adamw = list(cases.adamw_variants("cpu"))  # the rows before the first published-DPS one
    assert adamw and [r["method"] for r in result["rows"]] == adamw
    assert not list(tmp_path.glob("*.partial"))
    monkeypatch.undo()
    assert main(["bench", "--from-json", str(path)]) == 0
    assert "an incomplete run" in capsys.readouterr().out


@pytest.fixture
def saved(tmp_path):
    """Paths of a saved result and of a JSON that is not one."""
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(dict(meta=dict(date="", torch=""), devices={}, rows=[])))
    bad.write_text("{}")
    return good, bad


# name | the options (shell words) | the flag the usage error must name
BAD_OPTIONS = {name.strip(): (shlex.split(argv), flag.strip()) for name, argv, flag in (
    line.split(" | ") for line in """
unknown backend                  | --backends nope                              | --backends
no backend                       | --backends ,                                 | --backends
backend that runs on no device   | --backends cuda --device cpu                 | --backends
no repetition                    | --min-reps 0 --max-reps 0                    | --min-reps
max below min                    | --min-reps 5 --max-reps 2                    | --min-reps
max reps 0                       | --max-reps 0                                 | --max-reps
fractional reps                  | --min-reps 1.5                               | --min-reps
negative seconds                 | --seconds -1                                 | --seconds
nan seconds                      | --seconds nan                                | --seconds
infinite seconds                 | --seconds inf                                | --seconds
negative warm-up                 | --warmup -1                                  | --warmup
zero scale                       | --scale 0                                    | --scale
negative scale                   | --scale -0.5                                 | --scale
scale not a number               | --scale big                                  | --scale
scale past the memory            | --scale 1e9 --device cpu                     | --scale
no thread                        | --threads 0                                  | --threads
unknown section                  | --sections step,nope                         | --sections
no section                       | --sections ''                                | --sections
unknown device                   | --device tpu                                 | --device
device without the bench         | --device meta                                | --device
device twice                     | --device cpu,cpu                             | --device
gpu past the count               | --device cuda:99                             | --device
train of three                   | --train 1,2,3                                | --train
train with a zero                | --train 0,32,2,64,2,8                        | --train
heads not dividing the width     | --train 1,30,4,64,2,8                        | --train
json in a missing folder         | --json {tmp}/missing/bench.json              | --json
json onto a folder               | --json {tmp}                                 | --json
plot in a missing folder         | --plot {tmp}/missing/bench.png               | --plot
plot of an unknown format        | --plot {tmp}/bench.nope                      | --plot
json and plot the same file      | --json {tmp}/out --plot {tmp}/out            | --json and --plot
from a missing json              | --from-json {tmp}/absent.json                | --from-json
from a json that is no result    | --from-json {bad}                            | --from-json
json with from-json              | --from-json {good} --json {tmp}/x.json       | --json
""".strip().splitlines())}


@pytest.mark.parametrize("argv,flag", BAD_OPTIONS.values(), ids=BAD_OPTIONS)
def test_bad_options_are_usage_errors(argv, flag, tmp_path, saved, capsys, monkeypatch):
    if "--plot" in argv:
        pytest.importorskip("matplotlib")
    monkeypatch.setattr(cli, "run_bench", lambda *a, **k: pytest.fail("the bench ran"))
    good, bad = saved
    argv = [a.format(tmp=tmp_path, good=good, bad=bad) for a in argv]
    with pytest.raises(SystemExit) as exit:
        main(["bench", *argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "usage: " in err and flag in err, err


_META = dict(date="2026-12-08", torch="2.13.0")
_ROW = dict(device="cpu", section="step", method="AdamW fused", phase="explore", backend=None)
# name: the content of a --from-json file that is not a bench result, and the words the error must contain
MALFORMED = {
    "meta and devices not objects": (dict(meta=1, devices=2, rows={}), "meta must be an object"),
    "rows not a list": (dict(meta=_META, devices={}, rows={}), "rows must be a list"),
    "device without its fields": (dict(meta=_META, devices={"cpu": {"name": "x"}}, rows=[]),
                                  "devices['cpu'] has no 'error'; or devices['cpu'] has no 'copy_gbps'"),
    "row without its timings": (dict(meta=_META, devices={}, rows=[_ROW]), "rows[0] has no 'median_s'"),
    "timing of the wrong type": (dict(meta=_META, devices={}, rows=[dict(_ROW, median_s="fast", min_s=1, max_s=1,
                                                                          params_per_s=1, params=1)]),
                                 "rows[0]['median_s'] must be a number; got a string"),
    "error of the wrong type": (dict(meta=_META, devices={}, rows=[dict(_ROW, error=None)]),
                                "rows[0]['error'] must be a string; got null"),
}


@pytest.mark.parametrize("content,words", MALFORMED.values(), ids=MALFORMED)
def test_from_json_checks_the_content(content, words, tmp_path, capsys):
    path = tmp_path / "result.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as exit:
        main(["bench", "--from-json", str(path)])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --from-json: {path} is not a dps-fast bench result" in err and words in err, err


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
def test_memory_rows(param_dtype, capsys, one_thread):
    """The memory section's numbers: state bytes per parameter from the optimizer's state
    (DPS: two moments, a score and a mask bit on the managed entries), the peak at least
    that; a row runs in its own process and renders in the table."""
    from dps_fast.bench import memory

    torch.set_num_threads(1)
    item = 4 if param_dtype == "fp32" else 2
    adamw = memory.measure("AdamW", param_dtype, 0.0003, "cpu")
    assert adamw["state_bytes_per_param"] == pytest.approx(2 * item, abs=1e-3)  # moments in the param dtype
    for state_dtype, per_entry in (("fp32", 4), ("bf16", 2)):
        dps = memory.measure(f"dps_fast {state_dtype} state", param_dtype, 0.0003, "cpu")
        assert 2 * per_entry < dps["state_bytes_per_param"] <= 3 * per_entry + 1 / 8
    # in a fresh process (3M parameters: well above the page granularity) the peak holds the state
    row = memory.row("cpu", "dps_fast bf16 state", param_dtype, 0.01)
    assert row["section"] == "memory" and 6.0 < row["state_bytes_per_param"] <= 6.125
    assert row["peak_bytes_per_param"] >= row["state_bytes_per_param"]
    meta = dict(date="", torch="")
    devices = {"cpu": dict(name="cpu", copy_gbps=1.0, weight_set="w", params=1, managed=1, train_config="t")}
    text = report.format_table(dict(meta=meta, devices=devices, rows=[row], sweep=[]))
    assert "optimizer state memory" in text and "dps_fast bf16 state" in text


def test_bf16_rows_per_state_format(tmp_path, one_thread):
    """--dtype bf16 --state-dtype fp32,bf16: AdamW on bf16 tensors, a dps_fast row per format."""
    path = tmp_path / "bf16.json"
    assert main(["bench", *TINY, "--sections", "step", "--backends", "torch", "--dtype", "bf16", "--state-dtype",
                 "fp32,bf16", "--rounding", "stochastic", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["meta"]["dtype"] == "bfloat16" and result["meta"]["state_dtypes"] == ["fp32", "bf16"]
    rows = {(r["method"], r["phase"]): r for r in result["rows"]}
    assert rows["AdamW fused", "dense"]["state_bytes_per_param"] == pytest.approx(4.0, abs=1e-3)
    assert rows["dps_fast[torch] bf16 state", "exploit"]["state_bytes_per_param"] < 6.2
    assert rows["dps_fast[torch]", "exploit"]["state_bytes_per_param"] > 12
