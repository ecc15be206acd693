"""The bench's report: text tables (one per device and section) with the
headline ratios and notes, and the time-vs-size plot, from a result dict
(runner.run_bench's, or a saved --json)."""
import textwrap

from .. import saved
from ..saved import NUMBER, ListOf, MappingOf, OneOf, Record
from . import bytes_model
from .cases import SECTION_TITLES

# What the report and the plot read of a result (runner.run_bench's, or a --json file).
_ROW = dict(device=str, section=str, method=str, phase=str, backend=(str, None))
_TIMED = dict(median_s=NUMBER, min_s=NUMBER, max_s=NUMBER, params_per_s=NUMBER, params=NUMBER)
ROW = OneOf(Record({**_ROW, "error": str}),
            Record({**_ROW, **_TIMED}, dict(gbps=NUMBER, pct_copy=NUMBER, vs_fused=NUMBER,
                                            state_bytes_per_param=(NUMBER, None))),
            Record({**_ROW, "state_bytes_per_param": NUMBER, "peak_bytes_per_param": NUMBER, "params": NUMBER}))
DEVICE = OneOf(Record(dict(name=str, error=str)),
               Record(dict(name=str, copy_gbps=NUMBER, weight_set=str, params=NUMBER, managed=NUMBER,
                           train_config=str),
                      dict(threads=(int, None), add_gbps=NUMBER, unavailable=MappingOf((str, None)))))
RESULT = Record(dict(meta=Record(dict(date=str, torch=str), dict(busy_cpus=NUMBER, finished=bool, dtype=str,
                                                                 state_dtypes=ListOf(str), rounding=str)),
                     devices=MappingOf(DEVICE), rows=ListOf(ROW)),
                dict(sweep=ListOf(ROW)))


def load_result(path):
    """A saved --json result, checked (saved.SavedFileError otherwise)."""
    result = saved.read_json(path, RESULT, "a dps-fast bench result (bench --json)")
    result.setdefault("sweep", [])
    return result


def _fmt_time(seconds):
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def format_table(result):
    """The result as text tables, one per device and section, with notes and ratios."""
    lines = []
    meta = result["meta"]
    lines.append(f"dps-fast bench  {meta['date']}  torch {meta['torch']}"
                 + (f"  CPUs busy with other work at start: {meta['busy_cpus']:.1f}" if "busy_cpus" in meta else ""))
    if meta.get("dtype", "float32") != "float32" or meta.get("state_dtypes", ["fp32"]) != ["fp32"]:
        lines.append(f"parameters and gradients {meta.get('dtype', 'float32')}; DPSAdamW state "
                     f"{', '.join(meta.get('state_dtypes', ['fp32']))}, rounding {meta.get('rounding', 'nearest')}")
    if meta.get("busy_cpus", 0) > 0.3:
        lines.append("(other processes were running: CPU timings are noisy; compare the minimums, or try --threads 1)")
    header = (f"{'method':<26}{'phase':<15}{'median':>10}{'min - max':>21}{'Mparam/s':>10}"
              f"{'GB/s':>8}{'% copy':>8}{'x fused':>9}{'state B/p':>10}")
    if meta.get("finished") is False:
        lines.append(f"(an incomplete run: it stopped after {len(result['rows'])} rows)")
    for key, info in result["devices"].items():
        lines.append("")
        if "error" in info:
            lines.append(f"== {key}: could not be set up: {info['error']}")
            continue
        lines.append(f"== {key}: {info['name']}" + (f", {info['threads']} threads" if info.get("threads") else "")
                     + f"; copy bandwidth {info['copy_gbps']:.1f} GB/s"
                     + (f" (in-place add {info['add_gbps']:.1f} GB/s)" if "add_gbps" in info else ""))
        for name, reason in info.get("unavailable", {}).items():
            lines.append(f"   (backend {name!r} not run: {reason})")
        for section, title in SECTION_TITLES.items():
            rows = [r for r in result["rows"] if r["device"] == key and r["section"] == section]
            if not rows:
                continue
            if section == "memory":
                lines += _memory_table(title, rows)
                continue
            if section == "train":
                what = info["train_config"]
            else:
                count = info["managed"] if section == "boundary" else info["params"]
                what = (f"{info['weight_set']}, {count / 1e6:.1f}M "
                        f"{'managed ' if section == 'boundary' else ''}parameters")
            lines.append(f"-- {title}: {what}")
            lines.append(header)
            lines += [_format_row(r) for r in rows]
    lines.append("")
    lines += summary(result)
    lines.append(notes())
    return "\n".join(lines)


def _memory_table(title, rows):
    """The memory section: state and peak bytes per parameter (bench/memory.py)."""
    lines = [f"-- {title}: bytes per parameter of {rows[0].get('params', 0) / 1e6:.1f}M, after three steps "
             "(scores and masks made)", f"{'optimizer':<32}{'params':<8}{'state B/p':>10}{'peak B/p':>10}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['method']:<32}{row['phase']:<8}  could not run: {row['error']}"[:134])
        else:
            lines.append(f"{row['method']:<32}{row['phase']:<8}{row['state_bytes_per_param']:>10.2f}"
                         f"{row['peak_bytes_per_param']:>10.2f}")
    return lines


def _format_row(row):
    if "error" in row:
        return f"{row['method']:<26}{row['phase']:<15}  could not run: {row['error']}"[:134]
    fields = [f"{row['method']:<26}{row['phase']:<15}", f"{_fmt_time(row['median_s']):>10}",
              f"{_fmt_time(row['min_s']) + ' - ' + _fmt_time(row['max_s']):>21}",
              f"{row['params_per_s'] / 1e6:>10.0f}"]
    fields.append(f"{row['gbps']:>8.1f}" if "gbps" in row else f"{'-':>8}")
    fields.append(f"{row['pct_copy']:>7.0f}%" if "pct_copy" in row else f"{'-':>8}")
    fields.append(f"{row['vs_fused']:>9.2f}" if "vs_fused" in row else f"{'-':>9}")
    state = row.get("state_bytes_per_param")
    fields.append(f"{state:>10.2f}" if state is not None else f"{'-':>10}")
    return "".join(fields)


def _vs_fused(rows, device, section, method, phase):
    """The row's paired ratio to its fused-AdamW baseline, or None."""
    for row in rows:
        if (row["device"], row["section"], row["method"], row["phase"]) == (device, section, method, phase):
            return row.get("vs_fused")
    return None


def _faster(speedup):
    return f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"


def summary(result):
    """The headline ratios, one line per device and dps_fast backend. All come
    from the paired "x fused" ratios, so a ratio between two rows compares each
    with the baseline timed alongside it."""
    rows, lines = result["rows"], ["Ratios (paired, see x fused):"]
    for key in result["devices"]:
        methods = list(dict.fromkeys(r["method"] for r in rows if r["device"] == key and r["backend"]))
        for method in methods + ["published DPS"]:
            parts = []
            for phase in ("explore", "exploit"):
                mine = _vs_fused(rows, key, "step", method, phase)
                published = _vs_fused(rows, key, "step", "published DPS", phase)
                if mine and method != "published DPS":
                    parts.append(f"{phase} step {mine:.2f}x fused AdamW"
                                 + (f" ({_faster(published / mine)} than published-style)" if published else ""))
            mine = _vs_fused(rows, key, "boundary", method, "select")
            published = _vs_fused(rows, key, "boundary", "published DPS", "select")
            if mine and published and method != "published DPS":
                parts.append(f"boundary {_faster(published / mine)} than published-style")
            for phase in ("explore", "exploit"):
                mine = _vs_fused(rows, key, "train", method, phase)
                if mine:
                    parts.append(f"training step {phase} {100 * (mine - 1):+.1f}% vs AdamW")
            if parts:
                lines.append(f"  {key} {method}: " + "; ".join(parts))
    return lines


def notes():
    """What the columns mean (printed under the tables); the bytes model comes from bytes_model."""
    paragraphs = [
        f"median (min - max) per call. GB/s: the bytes model (fp32) / median: {bytes_model.describe()}.",
        f"% copy: that GB/s over the copy bandwidth ({bytes_model.COPY_RULE}) measured in this run: ~100% = "
        "the memory-bound floor (in-place updates can pass it on a CPU, where a copy also pays write-allocate "
        'reads: see "in-place add").',
        "x fused: time over fused AdamW's step (training rows: the fused-AdamW training step; boundary rows: one "
        "fused AdamW step), the baseline being run alternately with the row: the median over the row's runs of "
        "(run / the baseline run just before it), so that changes of the machine's load cancel (foreach / "
        "default AdamW where fused is unavailable). state B/p: persistent optimizer state bytes per parameter "
        "(after the row's warm-up; explore rows hold no mask yet).",
        "dps_fast rows: DPSAdamW(backend=...).step() inside an exploration stage / an exploitation stage with "
        "masks already selected; boundary: the backend's select_masks over every managed tensor.",
        "published DPS rows (dps_fast.published): its masking runs in autograd hooks, inside backward; its step "
        "rows time its gradient hook on every managed gradient + its torch AdamW step (torch's default "
        "implementation); its boundary row is its full descending torch.sort per tensor.",
        "training rows: zero_grad + forward + backward + clip to norm 1 + step of a BERT-shaped encoder.",
        "memory rows (fp32 and bf16 parameters, whatever --dtype): state = bytes of the optimizer's state tensors "
        "per parameter; peak = the rise of the process's peak memory over making the optimizer and three steps "
        "(state + transient buffers), each row in a fresh process (dps_fast/bench/memory.py).",
    ]
    return "\n".join(["Notes:"] + [textwrap.fill(text, 110, initial_indent="  ", subsequent_indent="  ",
                                                 break_on_hyphens=False) for text in paragraphs])


def plot(result, path):
    """Time per call vs parameter count (log-log), one line per method and phase."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["sweep"] + result["rows"] if "median_s" in r and r["section"] != "train"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}  # a colour per method,
    styles = {"explore": "-", "exploit": "--", "exploit freeze": ":"}  # a line style per phase
    devices = list(result["devices"])
    figure, axes = plt.subplots(len(devices), 2, figsize=(14, 5.5 * len(devices)), squeeze=False)
    for axes_row, key in zip(axes, devices):
        for ax, section in zip(axes_row, ("step", "boundary")):
            lines = {}
            for row in rows:
                if row["device"] == key and row["section"] == section:
                    points = lines.setdefault((row["method"], row["phase"]), {})
                    points[row["params"]] = row["median_s"]
            for (method, phase), points in lines.items():
                counts = sorted(points)
                label = method if phase in ("dense", "select") else f"{method} {phase}"
                ax.plot(counts, [points[c] * 1e3 for c in counts], marker="o", markersize=4,
                        color=colors[method], linestyle=styles.get(phase, "-"), label=label)
            copy = result["devices"][key].get("copy_gbps", 0) * 1e9
            if lines and copy:
                counts = sorted({c for points in lines.values() for c in points})
                per_entry = bytes_model.ADAMW_BYTES if section == "step" else bytes_model.SELECT_BYTES
                ax.plot(counts, [c * per_entry / copy * 1e3 for c in counts], color="black", linewidth=2.5,
                        alpha=0.35,
                        label=f"bytes model ({per_entry:g} B/entry) at the copy bandwidth")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("parameters" if section == "step" else "managed parameters")
            ax.set_ylabel("ms per call (median)")
            ax.set_title(f"{key}: {SECTION_TITLES[section]}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    meta = result["meta"]
    figure.suptitle(f"dps-fast bench, {meta['date']}, torch {meta['torch']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
