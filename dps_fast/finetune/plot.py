"""The --plot figure: one panel per setting. Runs with a dev curve (--eval-every)
are drawn over training (a thin line per seed, a thick line for the mean over
seeds, each seed's final accuracy as a dot right of the end, the degenerate
line dashed); runs without one as a dot per seed with the mean ± std bar."""
import math

from .report import DEGENERATE_MARGIN, curves, setting, summarize


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(key):
    task, size, lr, steps, storage = key
    return f"{task}, {size} examples, lr {lr:g}, {steps} steps" + (f", {storage}" if storage else "")


def _curves_panel(ax, runs, methods, colours, margin):
    majority = [r["majority"] for r in runs if r.get("majority") is not None]
    for index, method in enumerate(methods):
        mine = [r for r in runs if r["method"] == method and r.get("curve")]
        for run in mine:
            ax.plot([100 * s / run["steps"] for s, _ in run["curve"]], [100 * a for _, a in run["curve"]],
                    color=colours[method], alpha=0.25, linewidth=0.8)
        # each seed's final accuracy, a little right of the end, one column per method
        ax.scatter([101.5 + 1.5 * index] * len(mine), [100 * r["dev_accuracy"] for r in mine], s=10,
                   color=colours[method], alpha=0.8, linewidths=0)
        if mine:  # the mean curve of the report's table (one setting, one method)
            row, = curves(mine)
            ax.plot([100 * s / row["steps"] for s in row["points"]], row["mean"], color=colours[method],
                    linewidth=2, label=method)
    if majority:
        ax.axhline(100 * max(majority) + margin, color="grey", linestyle="--", linewidth=1,
                   label="degenerate below")
    ax.set_xlabel("training steps (%)")


def _dots_panel(ax, runs, methods):
    for x, row in enumerate(summarize(runs)):
        points = [100 * r["dev_accuracy"] for r in runs if r["method"] == row["method"]]
        offsets = [0.08 * (i - (len(points) - 1) / 2) for i in range(len(points))]
        ax.scatter([x + o for o in offsets], points, s=14, alpha=0.6)
        ax.errorbar(x + 0.3, row["mean"], yerr=0 if math.isnan(row["std"]) else row["std"],
                    fmt="o", color="black", capsize=3)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")


def plot(runs, path, margin=DEGENERATE_MARGIN):
    """Draw the runs' dev accuracy, one panel per setting (see the module docstring), to `path`."""
    plt = _pyplot()
    keys = list(dict.fromkeys(setting(r) for r in runs))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    columns = min(len(keys), 4)
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        mine = [r for r in runs if setting(r) == key]
        if any(r.get("curve") for r in mine):
            _curves_panel(ax, mine, methods, colours, margin)
        else:
            _dots_panel(ax, mine, list(dict.fromkeys(r["method"] for r in mine)))
        ax.set_title(_title(key), fontsize=9)
        ax.set_ylabel("dev accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
