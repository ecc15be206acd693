"""`dps-fast bench`: update throughput of torch AdamW, published-style DPS
and every dps_fast backend that runs here, per step and per stage boundary,
plus the whole fine-tuning step.

Per row: median time per call (min-max), parameters per second, effective
GB/s from the bytes model below, that as % of the copy bandwidth measured in
the same run, the ratio to fused AdamW (training rows: to the fused-AdamW
training step; timed alternately with each row, see measure), and the
persistent optimizer state in bytes per parameter.

Bytes model (fp32, per entry, the minimum each update must move): AdamW reads
p, g, m, v and writes p, m, v = 28 B; explore adds the score read and write
(+8 B, managed entries); exploit adds one packed mask bit (+1/8 B); the
selection reads each score and writes a mask bit (4.125 B per managed entry).
Copy bandwidth: 2 x bytes of a large tensor copy per second, measured in the
same run (also shown: an in-place add, 3 x bytes, closer to what in-place
updates can reach on a CPU; see copy_bandwidth). How each row is measured:
see dps_fast/bench_cases.py.
"""
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch

from . import backends, bench_cases
from .bench_cases import Case, Workload

# Default weight-set scale per device type: about a minute of benchmarking.
DEFAULT_SCALE = {"cpu": 1 / 24, "cuda": 1.0}
SECTION_TITLES = {"step": "optimizer step", "boundary": "stage boundary (selection)",
                  "train": "whole training step"}


# ----- timing -----------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(prepared, device):
    """Seconds one prepared.run() takes (after its untimed setup)."""
    if prepared.setup is not None:
        prepared.setup()
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        prepared.run()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    prepared.run()
    return time.perf_counter() - begin


def measure(prepared, device, min_reps=3, max_reps=100, seconds=1.0, warmup=2, baseline=None):
    """Seconds per prepared.run(): at least min_reps (at most max_reps)
    repetitions, more while under `seconds`, after up to `warmup` untimed ones
    (no more once they took `seconds`).

    baseline: another Prepared run alternately with this one (each timed
    repetition of it is preceded by one of the baseline), so that a slow
    drift of the machine's load hits both alike. Returns (times, baseline
    times); the latter empty without a baseline."""
    device = torch.device(device)
    start = time.perf_counter()
    for rep in range(warmup):
        if rep and time.perf_counter() - start > seconds:
            break
        for each in (baseline, prepared):
            if each is not None:
                _timed(each, device)
    times, baseline_times, start = [], [], time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < seconds):
        if baseline is not None:
            baseline_times.append(_timed(baseline, device))
        times.append(_timed(prepared, device))
    return times, baseline_times


def copy_bandwidth(device, nbytes=None, reps=10):
    """Memory bandwidth of a large tensor (far beyond the caches), bytes per second:
    (copy, in-place add). copy: target.copy_(source) counted as 2 x bytes, the
    usual convention (the reference of "% copy"); in-place add: a.add_(b)
    counted as 3 x bytes. On a CPU a copy also reads the target's lines before
    writing them (write-allocate), which in-place updates such as AdamW's do
    not pay, so they can exceed 100% of the copy figure; the add figure is the
    closer ceiling for them."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    source = torch.ones(nbytes // 4, device=device)
    target = torch.zeros_like(source)
    rates = []
    for run, moved in ((lambda: target.copy_(source), 2 * nbytes), (lambda: target.add_(source), 3 * nbytes)):
        times, _ = measure(bench_cases.Prepared(run=run), device, min_reps=reps, max_reps=reps, warmup=3)
        rates.append(moved / statistics.median(times))
    return tuple(rates)


# ----- running the cases -------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self, total, enabled=None):
        self.total, self.done = total, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.perf_counter()

    def show(self, label):
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
        sys.stderr.write(line[:120].ljust(120))
        sys.stderr.flush()

    def advance(self):
        self.done += 1

    def finish(self):
        if self.enabled:
            sys.stderr.write("\r" + " " * 120 + "\r")
            sys.stderr.flush()


def run_case(case, workload, timing, baseline=None):
    """Time one case; returns its row (a dict) or, if it cannot run, a row with 'error'.

    baseline: (Case, Prepared) of the row that "x fused" divides by, timed
    alternately with this case (see measure); None to time the case alone."""
    row = dict(device=case.device, section=case.section, method=case.method, phase=case.phase,
               backend=case.backend)
    prepared = None
    paired = baseline is not None and baseline[0] != case
    try:
        prepared = bench_cases.prepare(case, workload)
        times, baseline_times = measure(prepared, workload.device, **timing,
                                        baseline=baseline[1] if paired else None)
    except (RuntimeError, NotImplementedError) as error:  # e.g. out of memory
        row["error"] = str(error).splitlines()[0]
        return row
    finally:
        _sync(workload.device)
        if prepared is not None and prepared.close is not None:
            prepared.close()
    median = statistics.median(times)
    row.update(median_s=median, min_s=min(times), max_s=max(times), reps=len(times),
               params=prepared.entries, params_per_s=prepared.entries / median)
    if prepared.bytes_moved is not None:
        row.update(bytes=prepared.bytes_moved, gbps=prepared.bytes_moved / median / 1e9)
    if prepared.state_bytes is not None:
        row["state_bytes_per_param"] = prepared.state_bytes / prepared.params
    if baseline is not None:
        row["vs_method"] = baseline[0].method
        # each run against the baseline run just before it: load that changes within a row cancels too
        row["vs_fused"] = statistics.median(t / b for t, b in zip(times, baseline_times)) if paired else 1.0
    return row


def _baseline_case(device, section, adamw):
    """The row that "x fused" divides by: fused AdamW's step (for step and
    boundary rows) or training step; foreach / default where fused is missing."""
    if section == "train":
        return Case(str(device), "train", "AdamW fused" if "AdamW fused" in adamw else "AdamW default", "dense")
    for label in ("AdamW fused", "AdamW foreach", "AdamW for-loop"):
        if label in adamw:
            return Case(str(device), "step", label, "dense")
    return None


class _Baselines:
    """The prepared baseline of each section, built on first use, one alive at a time."""

    def __init__(self, workload, adamw):
        self.workload, self.adamw, self.current = workload, adamw, None

    def get(self, section):
        case = _baseline_case(self.workload.device, section, self.adamw)
        if case is None:
            return None
        if self.current is None or self.current[0] != case:
            self.current = None  # free the previous one first
            try:
                self.current = (case, bench_cases.prepare(case, self.workload))
            except RuntimeError:
                return None
        return self.current


def _add_copy_ratios(rows, copy_gbps):
    for row in rows:
        if "gbps" in row:
            row["pct_copy"] = 100 * row["gbps"] / (copy_gbps[row["device"]] / 1e9)


def run_bench(devices, scale=None, backend_names=None, sections=("step", "boundary", "train"),
              timing=None, train_config=None, sweep=False, progress=None, seed=0):
    """Run the benchmark; returns the result dict (what --json writes).

    sweep: also time the step and boundary rows on smaller weight sets, from
    1M parameters doubling up to the main one (for the time-vs-size plot)."""
    timing = timing or {}
    result = dict(meta=_meta(devices), devices={}, rows=[], sweep=[])
    plans = []
    for device in devices:
        device = torch.device(device)
        device_scale = scale if scale is not None else DEFAULT_SCALE.get(device.type, 1.0)
        config = train_config or bench_cases.default_train_config(device)
        adamw = bench_cases.adamw_variants(device)
        main = bench_cases.cases(device, backend_names, sections, adamw)
        extra = []
        layers, dim = bench_cases.weight_shape(device_scale)
        # the main weight set is the largest point of the plot; the sweep fills in below it
        for count in sweep_sizes(layers * bench_cases.layer_params(dim))[:-1] if sweep else ():
            extra += [(count, c) for c in bench_cases.cases(device, backend_names, ("step", "boundary"), adamw)]
        plans.append((device, device_scale, config, main, extra, adamw))
    bar = Progress(sum(len(m) + len(e) + 1 for *_, m, e, _ in plans), enabled=progress)
    copy_gbps = {}
    for device, device_scale, config, main, extra, adamw in plans:
        key = str(device)
        bar.show(f"{key} copy bandwidth")
        copy_gbps[key], add_gbps = copy_bandwidth(device)
        bar.advance()
        layers, dim = bench_cases.weight_shape(device_scale)
        workload = Workload(device, device_scale, config, seed)
        managed, plain = bench_cases.parameter_counts(workload.weights())
        result["devices"][key] = dict(
            name=_device_name(device), copy_gbps=copy_gbps[key] / 1e9, add_gbps=add_gbps / 1e9, scale=device_scale,
            weight_set=f"{layers} BERT layer(s) of width {dim}", params=managed + plain, managed=managed,
            train_config=config.describe(), threads=torch.get_num_threads() if device.type == "cpu" else None,
            unavailable={name: backends.unavailable_reason(name, device) for name in backends.BACKEND_NAMES
                         if name not in backends.available(device)})
        baselines = _Baselines(workload, adamw)
        for case in main:
            bar.show(f"{key} {SECTION_TITLES[case.section]}: {case.method} {case.phase}")
            result["rows"].append(run_case(case, workload, timing, baselines.get(case.section)))
            bar.advance()
        baselines.current = None
        workload.release()
        for count in sorted({c for c, _ in extra}):
            sized = Workload(device, bench_cases.scale_for_params(count), config, seed)
            for _, case in (e for e in extra if e[0] == count):
                bar.show(f"{key} sweep {count / 1e6:.0f}M: {case.method} {case.phase}")
                result["sweep"].append(run_case(case, sized, dict(timing, seconds=timing.get("seconds", 1.0) / 2)))
                bar.advance()
    bar.finish()
    _add_copy_ratios(result["rows"], copy_gbps)
    return result


def sweep_sizes(largest, smallest=1_000_000):
    """Parameter counts from `smallest` doubling up to `largest` (included)."""
    sizes, count = [], smallest
    while count < largest * 0.9:
        sizes.append(count)
        count *= 2
    return sizes + [largest]


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def _meta(devices):
    meta = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                command=" ".join(["dps-fast"] + sys.argv[1:]) if sys.argv else "",
                python=platform.python_version(), torch=torch.__version__, platform=platform.platform())
    busy = _busy_cpus()
    if busy is not None:
        meta["busy_cpus"] = busy  # other work on the machine distorts CPU timings
    return meta


def _busy_cpus(interval=0.5):
    """CPUs kept busy by other processes (from /proc/stat while this one sleeps), or None."""
    def sample():
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


# ----- reporting ---------------------------------------------------------------------

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
    if meta.get("busy_cpus", 0) > 0.3:
        lines.append("(other processes were running: CPU timings are noisy; compare the minimums, or try --threads 1)")
    header = (f"{'method':<22}{'phase':<15}{'median':>10}{'min - max':>21}{'Mparam/s':>10}"
              f"{'GB/s':>8}{'% copy':>8}{'x fused':>9}{'state B/p':>10}")
    for key, info in result["devices"].items():
        lines.append("")
        lines.append(f"== {key}: {info['name']}" + (f", {info['threads']} threads" if info.get("threads") else "")
                     + f"; copy bandwidth {info['copy_gbps']:.1f} GB/s"
                     + (f" (in-place add {info['add_gbps']:.1f} GB/s)" if "add_gbps" in info else ""))
        for name, reason in info.get("unavailable", {}).items():
            lines.append(f"   (backend {name!r} not run: {reason})")
        for section, title in SECTION_TITLES.items():
            rows = [r for r in result["rows"] if r["device"] == key and r["section"] == section]
            if not rows:
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
    lines.append(NOTES)
    return "\n".join(lines)


def _format_row(row):
    if "error" in row:
        return f"{row['method']:<22}{row['phase']:<15}  could not run: {row['error']}"[:130]
    fields = [f"{row['method']:<22}{row['phase']:<15}", f"{_fmt_time(row['median_s']):>10}",
              f"{_fmt_time(row['min_s']) + ' - ' + _fmt_time(row['max_s']):>21}",
              f"{row['params_per_s'] / 1e6:>10.0f}"]
    fields.append(f"{row['gbps']:>8.1f}{row['pct_copy']:>7.0f}%" if "gbps" in row else f"{'-':>8}{'-':>8}")
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


NOTES = """Notes:
  median (min - max) per call. GB/s: bytes model (fp32) / median: AdamW 28 B per entry (read p, g, m, v;
  write p, m, v), explore +8 B (score read + write), exploit +1/8 B (packed mask bit) on managed entries;
  selection 4.125 B per managed entry (read score, write mask bit). % copy: that GB/s over the copy
  bandwidth (2 x bytes of a large tensor copy per second) measured in this run: ~100% = the memory-bound
  floor (in-place updates can pass it on a CPU, where a copy also pays write-allocate reads: see "in-place add").
  x fused: time over fused AdamW's step (training rows: the fused-AdamW training step; boundary rows: one
  fused AdamW step), the baseline being run alternately with the row: the median over the row's runs of
  (run / the baseline run just before it), so that changes of the machine's load cancel (foreach /
  default AdamW where fused is unavailable). state B/p: persistent optimizer state
  bytes per parameter (after the row's warm-up; explore rows hold no mask yet).
  dps_fast rows: DPSAdamW(backend=...).step() inside an exploration stage / an exploitation stage with masks
  already selected; boundary: the backend's select_masks over every managed tensor.
  published DPS rows (dps_fast.published): its masking runs in autograd hooks, inside backward; its step
  rows time its gradient hook on every managed gradient + its torch AdamW step (torch's default
  implementation); its boundary row is its full descending torch.sort per tensor.
  training rows: zero_grad + forward + backward + clip to norm 1 + step of a BERT-shaped encoder."""


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
            copy = result["devices"][key]["copy_gbps"] * 1e9
            if lines:
                counts = sorted({c for points in lines.values() for c in points})
                per_entry = bench_cases.ADAMW_BYTES if section == "step" else bench_cases.SELECT_BYTES
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


# ----- command line ------------------------------------------------------------------

def _csv(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser):
    parser.add_argument("--scale", type=float, default=None,
                        help="weight set as a fraction of BERT-large's encoder (302M parameters; "
                             f"default {DEFAULT_SCALE['cpu']:.4g} on CPU, {DEFAULT_SCALE['cuda']:g} on CUDA)")
    parser.add_argument("--device", type=_csv, default=None,
                        help="comma-separated devices (default: cpu, and cuda when available)")
    parser.add_argument("--backends", type=_csv, default=None,
                        help="comma-separated dps_fast backends (default: every one available)")
    parser.add_argument("--sections", type=_csv, default=["step", "boundary", "train"],
                        help="comma-separated subset of step,boundary,train (default: all)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="time spent per row after the minimum repetitions (default 1.0)")
    parser.add_argument("--min-reps", type=int, default=3, help="minimum timed repetitions per row (default 3)")
    parser.add_argument("--max-reps", type=int, default=100, help="maximum timed repetitions per row (default 100)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions per row, at most (default 2)")
    parser.add_argument("--train", type=_csv, default=None, metavar="LAYERS,DIM,HEADS,VOCAB,BATCH,SEQ",
                        help="encoder of the training-step rows (default: 4,256,4,1024,8,64 on CPU; "
                             "24,1024,16,30522,16,128 (BERT-large) on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice, usually one per core)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of time per call vs parameter count (runs a size sweep from 1M "
                             "parameters up to the weight set; needs matplotlib)")
    parser.add_argument("--from-json", metavar="PATH", help="report (and plot) a saved JSON instead of running")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args):
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("--plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.from_json:
        with open(args.from_json) as file:
            result = json.load(file)
    else:
        devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
        for device in devices:
            try:
                if torch.device(device).type == "cuda" and not torch.cuda.is_available():
                    raise RuntimeError("CUDA is not available here")
            except RuntimeError as error:
                print(f"--device {device}: {error}", file=sys.stderr)
                return 2
        bad = set(args.sections) - set(SECTION_TITLES)
        if bad:
            print(f"--sections: unknown {', '.join(sorted(bad))}; choose from step,boundary,train", file=sys.stderr)
            return 2
        train_config = None
        if args.train:
            if len(args.train) != 6:
                print("--train takes six integers: LAYERS,DIM,HEADS,VOCAB,BATCH,SEQ", file=sys.stderr)
                return 2
            train_config = bench_cases.TrainConfig(*map(int, args.train))
        timing = dict(min_reps=args.min_reps, max_reps=args.max_reps, seconds=args.seconds, warmup=args.warmup)
        result = run_bench(devices, args.scale, args.backends, tuple(args.sections), timing, train_config,
                           sweep=bool(args.plot), progress=False if args.no_progress else None)
    print(format_table(result))
    if args.json and not args.from_json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
