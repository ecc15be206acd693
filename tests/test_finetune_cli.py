"""`dps-fast finetune` on the command line: every bad option is a usage error
(exit 2, naming the option) before any model is loaded; a good one runs,
saves, reloads and prints the tables."""
import json
import subprocess
import sys

import pytest

from dps_fast.data import INSTALL_HINT, MissingPackage


def _bundled_or_skip():
    from dps_fast.data import model_dir, pool_size

    try:
        model_dir()
        pool_size("trec")
    except MissingPackage:
        pytest.skip(f"bundled data/model packages missing: {INSTALL_HINT}")


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a model is loaded or a study starts."""
    import dps_fast.finetune.recipe as recipe
    import dps_fast.finetune.study as study

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or a study started before the options were checked")

    monkeypatch.setattr(recipe, "load_model", refuse)
    monkeypatch.setattr(study, "load_model", refuse)
    monkeypatch.setattr(study, "run_study", refuse)


def _usage_error(argv, capsys):
    from dps_fast.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["finetune", *argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err


# each: options, then words the error message must contain
BAD_OPTIONS = [
    (["--seeds", "0"], ["--seeds", "integer >= 1"]),
    (["--seeds", "-3"], ["--seeds"]),
    (["--seeds", "two"], ["--seeds"]),
    (["--first-seed", "-1"], ["--first-seed"]),
    (["--first-seed", str(2 ** 63 - 1), "--seeds", "2"], ["--first-seed", "2**63"]),
    (["--steps", "0"], ["--steps"]),
    (["--steps", "10,-1"], ["--steps"]),
    (["--steps", "10", "--epochs", "3"], ["--epochs", "--steps"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--epochs", "nan"], ["--epochs"]),
    (["--epochs", "inf"], ["--epochs"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--train-size", "0"], ["--train-size"]),
    (["--train-size", ""], ["--train-size"]),
    (["--train-size", "100000"], ["--train-size", "trec has 4881 training examples"]),
    (["--task", "mr,trec", "--train-size", "6000"], ["--train-size", "trec has 4881"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "-1e-5"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--lr", "1e-4,inf"], ["--lr"]),
    (["--sparsity", "1"], ["--sparsity", "[0, 1)"]),
    (["--sparsity", "-0.1"], ["--sparsity"]),
    (["--keep-fraction", "0"], ["--keep-fraction", "(0, 1]"]),
    (["--reserve", "1.5"], ["--keep-fraction"]),  # the published code's name, an alias
    (["--stage-ratio", "0"], ["--stage-ratio"]),
    (["--stage-ratio", "2"], ["--stage-ratio"]),
    (["--steps", "2"], ["--stage-ratio 0.05", "int(2 * 0.05) = 0", "--steps 2", "at least 20 steps"]),
    (["--method", "dps-mix", "--train-size", "16", "--epochs", "1"], ["--stage-ratio", "--epochs"]),
    (["--dev-size", "0"], ["--dev-size"]),
    (["--dev-size", "501"], ["--dev-size", "trec has 500 dev examples"]),
    (["--threads", "0"], ["--threads"]),
    (["--backend", "nope"], ["--backend", "invalid choice"]),
    (["--method", "sgd"], ["--method", "'sgd' is not one of"]),
    (["--method", ""], ["--method"]),
    (["--task", "sst2"], ["--task"]),
    (["--max-length", "2"], ["--max-length"]),
    (["--max-length", "100000"], ["--max-length", "at most 512"]),
    (["--eval-every", "0"], ["--eval-every"]),
    (["--eval-every", "1.5"], ["--eval-every"]),
    (["--ood", "amazon"], ["--ood", "--task mr"]),
    (["--task", "mr", "--ood", "yelp"], ["--ood"]),
    (["--task", "mr", "--ood-size", "10"], ["--ood-size", "--ood"]),
    (["--task", "mr", "--ood", "amazon", "--ood-size", "1000000"], ["--ood-size", "amazon has 3610"]),
    (["--degenerate-margin", "-1"], ["--degenerate-margin"]),
    (["--device", "nope"], ["--device"]),
    (["--device", "tpu"], ["--device"]),
]


@pytest.mark.parametrize("argv,words", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_are_usage_errors_before_any_model_loads(argv, words, no_training, capsys):
    _bundled_or_skip()
    err = _usage_error(["--train-size", "100", *argv] if "--train-size" not in argv else argv, capsys)
    for word in words:
        assert word in err, err


def test_unusable_output_paths_are_usage_errors_before_any_run(tmp_path, no_training, capsys):
    _bundled_or_skip()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for flag, path in (("--json", tmp_path / "missing" / "runs.json"), ("--json", tmp_path),
                       ("--json", a_file / "runs.json"), ("--plot", tmp_path / "missing" / "acc.png"),
                       ("--plot", tmp_path / "acc.nope")):
        err = _usage_error(["--train-size", "100", flag, str(path)], capsys)
        assert flag in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the checks leave nothing behind
    err = _usage_error(["--train-size", "100", "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.json")],
                       capsys)
    assert "--plot" in err


def test_backend_that_cannot_run_here_is_a_usage_error(no_training, capsys):
    _bundled_or_skip()
    from dps_fast.backends import unavailable_reason

    missing = next((b for b in ("cuda", "triton", "cpu") if unavailable_reason(b, "cpu") is not None), None)
    if missing is None:
        pytest.skip("every backend runs on the CPU here")
    err = _usage_error(["--train-size", "100", "--device", "cpu", "--backend", missing], capsys)
    assert f"--backend: {missing!r} cannot run on cpu" in err


def test_unavailable_cuda_device_is_a_usage_error(no_training, capsys):
    _bundled_or_skip()
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert "--device" in _usage_error(["--train-size", "100", "--device", "cuda"], capsys)


def test_load_checks_its_files(tmp_path, no_training, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "--load" in _usage_error(["--load", str(tmp_path / "missing.json")], capsys)
    assert "--load" in _usage_error(["--load", str(bad)], capsys)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"runs": []}))
    assert "--json" in _usage_error(["--load", str(good), "--json", str(tmp_path / "x.json")], capsys)


def test_usage_error_exit_status_from_the_command_line():
    done = subprocess.run([sys.executable, "-m", "dps_fast", "finetune", "--seeds", "0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--seeds" in done.stderr


def test_cli_runs_tabulates_and_reloads(tmp_path, capsys):
    _bundled_or_skip()
    from dps_fast.cli import main

    path, png = tmp_path / "runs.json", tmp_path / "acc.png"
    assert main(["finetune", "--task", "trec", "--method", "adamw", "--method", "dps", "--first-seed", "3",
                 "--train-size", "16", "--dev-size", "32", "--steps", "2", "--stage-ratio", "0.5",
                 "--max-length", "16", "--lr", "5e-5,1e-3", "--eval-every", "0.5", "--no-progress",
                 "--json", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for lr in ("5e-05", "0.001"):
        assert f"| trec | 16 | {lr} | 2 | adamw | 1 |" in out and f"| trec | 16 | {lr} | 2 | dps | 1 |" in out
    assert "Paired by seed" in out and "| 50% | 100% |" in out and png.stat().st_size > 1000
    saved = json.loads(path.read_text())
    assert [(r["lr"], r["method"], r["seed"]) for r in saved["runs"]] == [
        (lr, m, 3) for lr in (5e-5, 1e-3) for m in ("adamw", "dps")]
    assert all([step for step, _ in r["curve"]] == [1, 2] for r in saved["runs"])
    assert [r["lr"] for r in saved["recipes"]] == [5e-5, 1e-3] and saved["wall_seconds"] >= 0
    assert saved["command"] == (
        "dps-fast finetune --task trec --method adamw,dps --seeds 1 --first-seed 3 --train-size 16 --steps 2 "
        "--lr 5e-05,0.001 --batch-size 16 --max-length 16 --sparsity 0.3 --stage-ratio 0.5 --keep-fraction 0.3 "
        "--backend auto --dtype fp32 --state-dtype fp32 --rounding nearest --dev-size 32 --eval-every 0.5")
    assert main(["finetune", "--load", str(path)]) == 0
    assert "| trec | 16 | 0.001 | 2 | dps | 1 |" in capsys.readouterr().out


def test_cli_out_of_domain(tmp_path, capsys):
    _bundled_or_skip()
    from dps_fast.cli import main

    path = tmp_path / "runs.json"
    assert main(["finetune", "--task", "mr", "--method", "adamw", "--train-size", "16", "--dev-size", "16",
                 "--steps", "1", "--max-length", "16", "--ood", "all", "--ood-size", "24", "--no-progress",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "out-of-domain set amazon" in out and "out-of-domain set tweets" in out
    (run,) = json.loads(path.read_text())["runs"]
    assert sorted(run["ood"]) == ["amazon", "tweets"]
    assert all(0 <= r["accuracy"] <= 1 and 0.5 <= r["majority"] <= 1 for r in run["ood"].values())


_RUN = dict(task="trec", train_size=16, method="adamw", seed=0, lr=1e-3, steps=2, dev_accuracy=0.5, seconds=1.0)


@pytest.mark.parametrize("content,words", [
    (dict(runs=[1, 2]), "runs[0] must be an object; got an integer"),
    (dict(runs=[dict(task="trec")]), "runs[0] has no 'train_size'"),
    (dict(runs=[dict(_RUN, curve=[[1]])]), "runs[0]['curve'][0] must have 2 items"),
    (dict(runs=[{k: v for k, v in _RUN.items() if k != "lr"}]), "runs[0] has no 'lr', and the file no recipe"),
    ([_RUN], "the file must be an object; got a list"),
], ids=["runs-not-objects", "run-without-fields", "bad-curve", "no-lr", "not-an-object"])
def test_load_checks_the_content(content, words, tmp_path, no_training, capsys):
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(content))
    err = _usage_error(["--load", str(path)], capsys)
    assert f"argument --load: {path}" in err and words in err, err


def test_json_is_written_atomically(tmp_path, monkeypatch, capsys):
    """Each rewrite of --json goes through a temporary file: a write that fails keeps the
    last complete file."""
    _bundled_or_skip()
    import dps_fast.finetune.study as study
    import dps_fast.saved as saved
    from dps_fast.cli import main

    def fake_study(*args, on_run, **kwargs):
        on_run([_RUN])
        monkeypatch.setattr(saved.json, "dump", lambda data, file, **kw: (file.write('{"runs": ['),
                                                                         1 / 0))  # half written, then fails
        on_run([_RUN, _RUN])
        return [_RUN, _RUN]

    monkeypatch.setattr(study, "run_study", fake_study)
    path = tmp_path / "runs.json"
    with pytest.raises(ZeroDivisionError):
        main(["finetune", "--method", "adamw", "--train-size", "16", "--steps", "2", "--no-progress", "--json",
              str(path)])
    assert json.loads(path.read_text())["runs"] == [_RUN]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.json"]


def test_json_files_have_a_plain_writes_permissions(tmp_path):
    from dps_fast.saved import write_json

    new, old = tmp_path / "new.json", tmp_path / "old.json"
    with open(tmp_path / "plain.json", "w"):
        pass
    write_json(new, {"runs": []})
    old.write_text("{}")
    old.chmod(0o640)
    write_json(old, {"runs": []})
    assert new.stat().st_mode == (tmp_path / "plain.json").stat().st_mode and old.stat().st_mode & 0o777 == 0o640
