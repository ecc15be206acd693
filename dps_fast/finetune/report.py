"""Tables of a study's runs: accuracy over seeds, degenerate runs, paired
differences against AdamW (and against fp32 training for other storages),
dev accuracy over training.

A setting is (task, train size, learning rate, steps, storage); inside a
setting the runs of different methods with the same seed share the head
initialisation and the batch order, so they are compared seed by seed
(paired). The storage (recipe.Recipe.storage: the model's dtype, the state
format, the rounding) is "" for fp32 training, and is shown beside the
method otherwise.

A run is *degenerate* when its accuracy is below the majority-class rate of
the evaluated set plus DEGENERATE_MARGIN points: it does no better than
always answering the most frequent class.
"""
import math
import statistics

from .. import saved
from ..saved import NUMBER, ListOf, MappingOf, Record

DEGENERATE_MARGIN = 2.0  # points of accuracy (%)
REFERENCE = "adamw"  # what the paired differences are taken against

# What the tables and the plot read of a run (recipe.train_run's result, or a --json file's).
RUN = Record(dict(task=str, train_size=int, method=str, seed=int, steps=int, dev_accuracy=NUMBER, seconds=NUMBER),
             dict(lr=NUMBER, majority=(NUMBER, None), curve=ListOf(ListOf(NUMBER, length=2)),
                  ood=MappingOf(Record(dict(accuracy=NUMBER, majority=NUMBER))), storage=str))
STUDY = Record(dict(runs=ListOf(RUN)), dict(recipe=Record({}, dict(lr=NUMBER))))


def load_runs(paths):
    """The runs of these --json files, checked (saved.SavedFileError naming the file
    and the field otherwise); runs of files written before runs recorded their
    learning rate take it from the file's recipe."""
    runs = []
    for path in paths:
        study = saved.read_json(path, STUDY, "a dps-fast finetune result (finetune --json)")
        for i, run in enumerate(study["runs"]):
            if "lr" not in run:
                if "lr" not in study.get("recipe", {}):
                    raise saved.SavedFileError(f"{path}: runs[{i}] has no 'lr', and the file no recipe['lr']")
                run["lr"] = study["recipe"]["lr"]
            runs.append(run)
    return runs


SETTING = ("task", "train_size", "lr", "steps", "storage")


def setting(run):
    return run["task"], run["train_size"], run["lr"], run["steps"], run.get("storage", "")


def metrics(runs):
    """"dev", then every out-of-domain set found in the runs, in first-seen order."""
    return ["dev"] + list(dict.fromkeys(name for r in runs for name in r.get("ood", {})))


def _score(run, metric):
    """(accuracy %, majority-class rate % or None) of `run` on `metric`, or None if not evaluated there."""
    if metric == "dev":
        majority = run.get("majority")
        return 100 * run["dev_accuracy"], None if majority is None else 100 * majority
    found = run.get("ood", {}).get(metric)
    return None if found is None else (100 * found["accuracy"], 100 * found["majority"])


def _groups(runs, metric):
    """{(setting, method): {seed: (accuracy %, majority %)}}, in first-seen order."""
    groups = {}
    for run in runs:
        score = _score(run, metric)
        if score is not None:
            groups.setdefault((setting(run), run["method"]), {})[run["seed"]] = score
    return groups


def summarize(runs, metric="dev", margin=DEGENERATE_MARGIN):
    """One row per (setting, method), in first-seen order: accuracy (%) over
    seeds on `metric` ("dev" or an out-of-domain set) and the degenerate count
    (None when the runs did not record the majority-class rate)."""
    seconds = {}
    for run in runs:
        seconds.setdefault((setting(run), run["method"]), []).append(run["seconds"])
    summary = []
    for (key, method), by_seed in _groups(runs, metric).items():
        accuracies = [a for a, _ in by_seed.values()]
        majorities = [m for _, m in by_seed.values()]
        degenerate = None if None in majorities else sum(a < m + margin for a, m in by_seed.values())
        summary.append(dict(zip(SETTING, key), method=method, metric=metric,
                            seeds=len(accuracies), mean=statistics.fmean(accuracies),
                            std=statistics.stdev(accuracies) if len(accuracies) > 1 else float("nan"),
                            min=min(accuracies), max=max(accuracies), degenerate=degenerate,
                            seconds=statistics.fmean(seconds[key, method])))
    return summary


def _key(row):
    return tuple(row[name] for name in SETTING)


def _setting_cells(row):
    method = row["method"] + (f" [{row['storage']}]" if row["storage"] else "")
    return f"| {row['task']} | {row['train_size']} | {row['lr']:g} | {row['steps']} | {method} |"


SETTING_HEADER = "| task | train | lr | steps | method |"
SETTING_RULE = "|---|---:|---:|---:|---|"


def format_table(summary):
    """Markdown table of accuracy (%) mean ± sample std over seeds; Δ mean is against adamw."""
    metric = summary[0]["metric"] if summary else "dev"
    base = {_key(r): r["mean"] for r in summary if r["method"] == REFERENCE}
    lines = [f"{SETTING_HEADER} seeds | {metric} acc % (mean ± std) | Δ mean vs {REFERENCE} | min | max | "
             f"degenerate | s/run |",
             f"{SETTING_RULE}---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        ref = base.get(_key(r))
        delta = "" if ref is None or r["method"] == REFERENCE else f"{r['mean'] - ref:+.2f}"
        std = "–" if math.isnan(r["std"]) else format(r["std"], ".2f")
        degenerate = "–" if r["degenerate"] is None else str(r["degenerate"])
        lines.append(f"{_setting_cells(r)} {r['seeds']} | {r['mean']:.2f} ± {std} | {delta} | {r['min']:.2f} | "
                     f"{r['max']:.2f} | {degenerate} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def t_pvalue(t, df):
    """Two-sided p-value of Student's t with `df` degrees of freedom (Simpson's rule on the density)."""
    if math.isinf(t):
        return 0.0
    t = abs(t)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x):
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))

    n = 2000
    h = t / n
    area = density(0) + density(t) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
    return max(0.0, 1 - 2 * area * h / 3)


def _differences(diffs):
    """Mean and sample std of paired differences (points), the paired t and its
    two-sided p, and how many are better / tied / worse."""
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    if len(diffs) < 2:
        t = float("nan")
    elif std == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(len(diffs)))
    ties = 1e-9
    return dict(seeds=len(diffs), mean=mean, std=std, t=t,
                p=float("nan") if math.isnan(t) else t_pvalue(t, len(diffs) - 1),
                better=sum(d > ties for d in diffs), tied=sum(abs(d) <= ties for d in diffs),
                worse=sum(d < -ties for d in diffs))


def _paired_rows(groups, base_of, metric):
    """A row per group that has a base group (base_of(key, method) -> the base's key,
    or None): its runs minus the base's on the seeds both ran."""
    rows = []
    for (key, method), by_seed in groups.items():
        base = groups.get(base_of(key, method))
        if base is None:
            continue
        diffs = [by_seed[s][0] - base[s][0] for s in by_seed if s in base]
        if diffs:
            rows.append(dict(zip(SETTING, key), method=method, metric=metric, **_differences(diffs)))
    return rows


def paired(runs, metric="dev", reference=REFERENCE):
    """One row per (setting, method other than `reference`): the method minus
    `reference` on the seeds both ran, mean and sample std of the differences
    (points), the paired t and its two-sided p, and seeds better / tied / worse."""
    return _paired_rows(_groups(runs, metric),
                        lambda key, method: None if method == reference else (key, reference), metric)


FP32 = "fp32"  # what a storage is compared against: fp32 training (storage "")


def paired_storage(runs, metric="dev"):
    """One row per (setting, method) of a storage other than fp32 training: the run
    minus the same method's fp32 run of the same seed (the same head initialisation
    and batch order), as paired() computes it."""
    where = SETTING.index("storage")
    return _paired_rows(_groups(runs, metric),
                        lambda key, method: None if key[where] == "" else (key[:where] + ("",), method), metric)


def format_paired(rows, against=REFERENCE):
    """Markdown table of paired differences against adamw (points of accuracy), or
    against what `against` names."""
    metric = rows[0]["metric"] if rows else "dev"
    lines = [f"{SETTING_HEADER} seeds | Δ {metric} acc vs {against} (mean ± std) | paired t | p | "
             "better / tied / worse |",
             f"{SETTING_RULE}---:|---:|---:|---:|:---:|"]
    for r in rows:
        std = "–" if math.isnan(r["std"]) else format(r["std"], ".2f")
        t = "–" if math.isnan(r["t"]) else format(round(r["t"], 2) + 0.0, "+.2f")
        p = "–" if math.isnan(r["p"]) else format(r["p"], ".3f")
        mean = round(r["mean"], 2) + 0.0  # no "-0.00" for a difference that rounds to zero (nor for t)
        lines.append(f"{_setting_cells(r)} {r['seeds']} | {mean:+.2f} ± {std} | {t} | {p} | "
                     f"{r['better']} / {r['tied']} / {r['worse']} |")
    return "\n".join(lines)


def curves(runs):
    """One row per (setting, method) whose runs recorded a dev curve at the
    same steps: the mean over seeds of the dev accuracy (%) at each step,
    the mean of each run's best point, and the mean of final minus best."""
    groups = {}
    for run in runs:
        if run.get("curve"):
            groups.setdefault((setting(run), run["method"]), []).append(run["curve"])
    rows = []
    for (key, method), found in groups.items():
        points = [step for step, _ in found[0]]
        found = [c for c in found if [step for step, _ in c] == points]
        best = [max(a for _, a in c) for c in found]
        rows.append(dict(zip(SETTING, key), method=method, seeds=len(found),
                         points=points, mean=[100 * statistics.fmean(c[i][1] for c in found) for i in range(len(points))],
                         best=100 * statistics.fmean(best),
                         drop=100 * statistics.fmean(c[-1][1] - b for c, b in zip(found, best))))
    return rows


def format_curves(rows):
    """Markdown table of the dev curves, one column per evaluation (% of the run's steps)."""
    if not rows:
        return ""
    fractions = [round(100 * p / rows[0]["steps"]) for p in rows[0]["points"]]
    same = all([round(100 * p / r["steps"]) for p in r["points"]] == fractions for r in rows)
    head = " | ".join(f"{f}%" for f in fractions) if same else "dev acc % at each evaluation"
    lines = [f"{SETTING_HEADER} seeds | {head} | best | final − best |",
             f"{SETTING_RULE}---:|{'---:|' * (len(fractions) if same else 1)}---:|---:|"]
    for r in rows:
        values = " | ".join(f"{v:.1f}" for v in r["mean"]) if same else \
            ", ".join(f"{p}: {v:.1f}" for p, v in zip(r["points"], r["mean"]))
        lines.append(f"{_setting_cells(r)} {r['seeds']} | {values} | {r['best']:.2f} | {r['drop']:+.2f} |")
    return "\n".join(lines)


def report(runs, margin=DEGENERATE_MARGIN):
    """Every table of the runs, as Markdown with short headings."""
    parts = []
    for metric in metrics(runs):
        where = "dev set" if metric == "dev" else f"out-of-domain set {metric}"
        parts.append(f"Accuracy on the {where} (degenerate: below the majority-class rate + {margin:g} points):\n\n"
                     + format_table(summarize(runs, metric, margin)))
        rows = paired(runs, metric)
        if rows:
            parts.append(f"Paired by seed, against {REFERENCE}, on the {where}:\n\n" + format_paired(rows))
        rows = paired_storage(runs, metric)
        if rows:
            parts.append(f"Paired by seed, against the same method in {FP32}, on the {where}:\n\n"
                         + format_paired(rows, against=FP32))
    rows = curves(runs)
    if rows:
        parts.append("Dev accuracy over training (mean over seeds):\n\n" + format_curves(rows))
    return "\n\n".join(parts)
