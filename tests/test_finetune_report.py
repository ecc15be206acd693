"""`dps-fast finetune`'s tables and plot, on made-up runs (no training)."""
import json
import math
from pathlib import Path

import pytest

from dps_fast.finetune import format_curves, format_paired, format_table, paired, plot, summarize
from dps_fast.finetune.report import curves, load_runs, paired_storage, report, t_pvalue

QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "quality"


def run(method, seed, accuracy, majority=0.25, lr=1e-4, size=100, steps=70, task="trec", **extra):
    return dict(task=task, train_size=size, lr=lr, steps=steps, method=method, seed=seed, dev_accuracy=accuracy,
                majority=majority, seconds=1.0, **extra)


def test_summary_statistics_and_degenerate_runs():
    runs = [run(m, s, a) for m, accs in (("adamw", (0.80, 0.84, 0.26)), ("dps", (0.83, 0.83, 0.30)))
            for s, a in enumerate(accs)]
    rows = summarize(runs)
    assert [(r["method"], round(r["mean"], 6), r["min"], r["degenerate"]) for r in rows] == [
        ("adamw", round(190 / 3, 6), 26.0, 1), ("dps", round(196 / 3, 6), 30.0, 0)]  # 26 < 25 + 2 <= 30
    assert rows[0]["std"] == pytest.approx(math.sqrt(((80 - 190 / 3) ** 2 + (84 - 190 / 3) ** 2 +
                                                      (26 - 190 / 3) ** 2) / 2))
    assert summarize(runs, margin=6)[1]["degenerate"] == 1
    table = format_table(rows)
    assert "| task | train | lr | steps | method | seeds | dev acc % (mean ± std) |" in table
    assert "| trec | 100 | 0.0001 | 70 | dps | 3 | 65.33 ± " in table and "| +2.00 | 30.00 | 83.00 | 0 | 1 |" in table
    settings = summarize(runs + [run("adamw", 0, 0.5, lr=1e-3)])
    assert [(r["lr"], r["method"], r["seeds"]) for r in settings] == [(1e-4, "adamw", 3), (1e-4, "dps", 3),
                                                                      (1e-3, "adamw", 1)]


def test_t_pvalue():
    assert t_pvalue(2.776445, 4) == pytest.approx(0.05, abs=1e-4)
    assert t_pvalue(-12.706205, 1) == pytest.approx(0.05, abs=1e-4)
    assert t_pvalue(0.0, 4) == pytest.approx(1.0) and t_pvalue(math.inf, 4) == 0.0


def test_paired_differences_by_seed():
    adamw = (0.80, 0.70, 0.60, 0.90)
    dps = (0.82, 0.70, 0.61, 0.89, 0.99)  # seed 4 has no adamw partner: left out
    runs = [run("adamw", s, a) for s, a in enumerate(adamw)] + [run("dps", s, a) for s, a in enumerate(dps)]
    (row,) = paired(runs)
    diffs = [2.0, 0.0, 1.0, -1.0]
    assert row["seeds"] == 4 and row["mean"] == pytest.approx(0.5)
    sd = math.sqrt(sum((d - 0.5) ** 2 for d in diffs) / 3)
    assert row["std"] == pytest.approx(sd) and row["t"] == pytest.approx(0.5 / (sd / 2))
    assert (row["better"], row["tied"], row["worse"]) == (2, 1, 1) and 0.3 < row["p"] < 0.7
    assert "| trec | 100 | 0.0001 | 70 | dps | 4 | +0.50 ± 1.29 | +0.77 | " in format_paired([row])
    (same,) = paired([run("adamw", 0, 0.5), run("dps", 0, 0.6), run("adamw", 1, 0.5), run("dps", 1, 0.6)])
    assert same["t"] == math.inf and same["p"] == 0.0


def test_storages_paired_against_fp32_by_method_and_seed():
    runs = [run(m, s, a) for m, s, a in (("adamw", 0, 0.80), ("adamw", 1, 0.70), ("dps", 0, 0.78), ("dps", 1, 0.72))]
    bf16 = [dict(run(m, s, a), storage="bf16, stochastic")
            for m, s, a in (("adamw", 0, 0.79), ("adamw", 1, 0.72), ("dps", 0, 0.78), ("dps", 1, 0.69))]
    rows = {r["method"]: r for r in paired_storage(runs + bf16)}
    assert set(rows) == {"adamw", "dps"} and all(r["storage"] == "bf16, stochastic" for r in rows.values())
    assert rows["adamw"]["mean"] == pytest.approx(0.5) and rows["dps"]["mean"] == pytest.approx(-1.5)
    assert (rows["dps"]["better"], rows["dps"]["tied"], rows["dps"]["worse"]) == (0, 1, 1)
    assert paired_storage(runs) == [] and paired_storage(bf16) == []  # nothing to pair with
    text = report(runs + bf16)
    assert "against the same method in fp32" in text and "| dps [bf16, stochastic] | 2 | -1.50 ± 2.12 |" in text
    assert "Δ dev acc vs fp32" in text
    pairs = [run("dps", 0, 0.1 + 0.2), dict(run("dps", 0, 0.3), storage="bf16, nearest"),  # -3.6e-15
             run("dps", 1, 0.50), dict(run("dps", 1, 0.51), storage="bf16, nearest"),
             run("dps", 2, 0.51), dict(run("dps", 2, 0.50), storage="bf16, nearest")]
    (zero,) = paired_storage(pairs)
    assert zero["mean"] < 0 and zero["t"] < 0 and "| +0.00 ± 1.00 | +0.00 |" in format_paired([zero])


def test_out_of_domain_metrics():
    runs = [run("adamw", s, 0.8, task="mr", ood=dict(amazon=dict(accuracy=a, majority=0.59)))
            for s, a in enumerate((0.70, 0.60))]
    runs += [run("dps", s, 0.8, task="mr", ood=dict(amazon=dict(accuracy=a, majority=0.59)))
             for s, a in enumerate((0.72, 0.65))]
    (adamw, dps) = summarize(runs, "amazon")
    assert adamw["metric"] == "amazon" and adamw["degenerate"] == 1 and dps["mean"] == pytest.approx(68.5)
    assert paired(runs, "amazon")[0]["mean"] == pytest.approx(3.5)
    text = report(runs)
    assert "out-of-domain set amazon" in text and "| amazon acc % (mean ± std) |" in text


def test_curves_show_peak_and_final():
    runs = [run("adamw", s, c[-1][1], curve=c) for s, c in enumerate(
        ([[35, 0.6], [70, 0.5]], [[35, 0.8], [70, 0.8]]))]
    (row,) = curves(runs)
    assert row["points"] == [35, 70] and row["mean"] == pytest.approx([70.0, 65.0])
    assert row["best"] == pytest.approx(70.0) and row["drop"] == pytest.approx(-5.0)
    assert "| 50% | 100% | best | final − best |" in format_curves([row])
    assert "| 70.0 | 65.0 | 70.00 | -5.00 |" in format_curves([row])


def test_plot_curves_and_dots(tmp_path):
    pytest.importorskip("matplotlib")
    with_curves = [run(m, s, 0.5 + 0.01 * s, lr=lr, curve=[[35, 0.4], [70, 0.5 + 0.01 * s]])
                   for lr in (1e-4, 1e-3) for m in ("adamw", "dps") for s in range(3)]
    plot(with_curves, tmp_path / "curves.png")
    dots = [run(m, s, 0.5 + 0.01 * s, size=n) for n in (500, 1000) for m in ("adamw", "dps") for s in range(3)]
    plot(dots, tmp_path / "dots.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000 and (tmp_path / "dots.png").stat().st_size > 1000


def test_files_of_the_first_study_still_load():
    """Runs saved before runs recorded their learning rate take it from the file's recipe."""
    path = QUALITY / "trec500_seeds34.json"
    if not path.exists():
        pytest.skip("benchmarks/quality is not in this checkout")
    runs = load_runs([path])
    assert {r["lr"] for r in runs} == {json.loads(path.read_text())["recipe"]["lr"]}
    rows = summarize(runs)
    assert {r["method"] for r in rows} == {"adamw", "dps"} and all(r["degenerate"] is None for r in rows)
    assert "| – |" in format_table(rows)
