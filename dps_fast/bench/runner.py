"""Running the bench: every case of every device, one row each, into the
result dict that --json writes.

A row that fails for any reason (out of memory, a Triton compilation error,
a CUDA fault) is kept with its reason and the run goes on; the caller is
handed the result after every row (on_row), so that a run stopped midway
still leaves what it measured. Progress goes to stderr: a bar on a terminal,
else one flushed line per row, so that the log of a killed run says where it
stopped.
"""
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from .. import backends
from . import cases as bench_cases
from . import memory as memory_rows
from .cases import SECTION_TITLES, Case
from .timing import copy_bandwidth, measure, sync
from .weights import (DEFAULT_SCALE, Workload, default_train_config, layer_params, parameter_counts,
                      scale_for_params, weight_shape)


class Progress:
    """A one-line bar on stderr (bar=None: when it is a terminal), else a line per row."""

    def __init__(self, total, bar=None):
        self.total, self.done = total, 0
        self.bar = sys.stderr.isatty() if bar is None else bar
        self.start = time.perf_counter()

    def _prefix(self):
        return f"[{self.done + 1}/{self.total} {time.perf_counter() - self.start:4.0f}s]"

    def begin(self, label):
        if self.bar:
            width = 30
            filled = width * self.done // max(self.total, 1)
            line = f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self._prefix()} {label}"
            sys.stderr.write(line[:120].ljust(120))
        else:
            sys.stderr.write(f"bench {self._prefix()} {label}: ")
        sys.stderr.flush()

    def end(self, outcome=""):
        self.done += 1
        if not self.bar:
            sys.stderr.write(outcome + "\n")
            sys.stderr.flush()

    def finish(self):
        if self.bar:
            sys.stderr.write("\r" + " " * 120 + "\r")
            sys.stderr.flush()


def _reason(error):
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0]}" if first else type(error).__name__


def run_case(case, workload, timing, baseline=None, copy_gbps=None):
    """Time one case; returns its row (a dict), with 'error' if it could not run.

    baseline: (Case, Prepared) of the row that "x fused" divides by, timed
    alternately with this case (see measure); None to time the case alone.
    copy_gbps: the device's copy bandwidth, for the row's "% copy"."""
    row = dict(device=case.device, section=case.section, method=case.method, phase=case.operation,
               backend=case.backend)
    prepared = None
    paired = baseline is not None and baseline[0] != case
    try:
        prepared = bench_cases.prepare(case, workload)
        times, baseline_times = measure(prepared, workload.device, **timing,
                                        baseline=baseline[1] if paired else None)
        sync(workload.device)
    except Exception as error:  # any failure of this row (e.g. out of memory, a kernel that does not compile)
        row["error"] = _reason(error)
    finally:
        try:
            if prepared is not None and prepared.close is not None:
                prepared.close()
        except Exception as error:
            row.setdefault("error", f"while closing: {_reason(error)}")
    if "error" in row:
        return row
    median = statistics.median(times)
    row.update(median_s=median, min_s=min(times), max_s=max(times), reps=len(times),
               params=prepared.timed_params, params_per_s=prepared.timed_params / median)
    if prepared.bytes_moved is not None:
        row.update(bytes=prepared.bytes_moved, gbps=prepared.bytes_moved / median / 1e9)
        if copy_gbps:
            row["pct_copy"] = 100 * row["gbps"] / copy_gbps
    if prepared.state_bytes is not None:
        row["state_bytes_per_param"] = prepared.state_bytes / prepared.model_params
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
            except Exception:  # its own row says why
                return None
        return self.current


def _outcome(row):
    if "error" in row:
        return f"FAILED ({row['error'][:100]})"
    return f"{row['median_s'] * 1e3:.3f} ms" + (f", {row['gbps']:.1f} GB/s" if "gbps" in row else "")


def run_bench(devices, scale=None, backend_names=None, sections=tuple(SECTION_TITLES), timing=None, train_config=None,
              sweep=False, progress=None, seed=0, on_row=None, dtype=torch.float32, state_dtypes=("fp32",),
              rounding="nearest"):
    """Run the benchmark; returns the result dict (what --json writes).

    sweep: also time the step and boundary rows on smaller weight sets, from
    1M parameters doubling up to the main one (for the time-vs-size plot).
    progress: Progress's `bar` (None: a bar when stderr is a terminal).
    on_row: called with the result so far after every row.
    dtype: of every row's parameters and gradients (AdamW's moments follow it, as
    torch's do); state_dtypes: a dps_fast row per backend and state format;
    rounding: DPSAdamW's rounding of bf16 parameters."""
    timing = timing or {}
    on_row = on_row or (lambda result: None)
    result = dict(meta=dict(_meta(devices), dtype=str(dtype).replace("torch.", ""), state_dtypes=list(state_dtypes),
                            rounding=rounding), devices={}, rows=[], sweep=[])
    formats = dict(state_dtypes=tuple(state_dtypes))
    plans = []
    for device in devices:
        device = torch.device(device)
        device_scale = scale if scale is not None else DEFAULT_SCALE.get(device.type, 1.0)
        adamw = bench_cases.adamw_variants(device)
        main = bench_cases.cases(device, backend_names, sections, adamw, **formats)
        extra = []
        layers, dim = weight_shape(device_scale)
        # the main weight set is the largest point of the plot; the sweep fills in below it
        for count in sweep_sizes(layers * layer_params(dim))[:-1] if sweep else ():
            extra += [(count, c) for c in bench_cases.cases(device, backend_names, ("step", "boundary"), adamw,
                                                            **formats)]
        memory = [(dtype_name, label) for dtype_name in memory_rows.DTYPES for label in memory_rows.optimizers(dtype_name)]
        plans.append((device, device_scale, train_config or default_train_config(device), main, extra, adamw,
                      memory if "memory" in sections else []))
    bar = Progress(sum(len(m) + len(e) + len(mem) + 1 for *_, m, e, _, mem in plans), bar=progress)
    for device, device_scale, config, main, extra, adamw, memory in plans:
        key = str(device)
        bar.begin(f"{key} copy bandwidth and weight set")
        try:
            info, workload = _device_info(device, device_scale, config, seed, dtype, rounding)
        except Exception as error:  # every row of the device says why
            info, workload = dict(name=key, error=_reason(error)), None
        result["devices"][key] = info
        bar.end(info.get("error", f"{info.get('copy_gbps', 0):.1f} GB/s"))
        on_row(result)
        baselines = _Baselines(workload, adamw) if workload is not None else None
        for case in main:
            bar.begin(f"{key} {case.section}: {case.method} {case.operation}")
            if workload is None:
                row = dict(device=key, section=case.section, method=case.method, phase=case.operation,
                           backend=case.backend, error=f"device setup failed: {info['error']}")
            else:
                row = run_case(case, workload, timing, baselines.get(case.section), info["copy_gbps"])
            result["rows"].append(row)
            bar.end(_outcome(row))
            on_row(result)
        if workload is None:
            continue
        baselines.current = None
        workload.release()
        for dtype_name, label in memory:
            bar.begin(f"{key} memory: {label} {dtype_name}")
            row = memory_rows.row(device, label, dtype_name, device_scale, seed)
            result["rows"].append(row)
            bar.end(row.get("error", f"{row.get('state_bytes_per_param', 0):.2f} B/param"))
            on_row(result)
        for count in sorted({c for c, _ in extra}):
            sized = Workload(device, scale_for_params(count), config, seed, dtype, rounding)
            for _, case in (e for e in extra if e[0] == count):
                bar.begin(f"{key} sweep {count / 1e6:.0f}M: {case.method} {case.operation}")
                row = run_case(case, sized, dict(timing, seconds=timing.get("seconds", 1.0) / 2),
                               copy_gbps=info["copy_gbps"])
                result["sweep"].append(row)
                bar.end(_outcome(row))
                on_row(result)
    bar.finish()
    result["meta"]["finished"] = True
    on_row(result)
    return result


def _device_info(device, scale, config, seed, dtype=torch.float32, rounding="nearest"):
    """(the device's entry of result["devices"], its Workload)."""
    copy_gbps, add_gbps = copy_bandwidth(device)
    layers, dim = weight_shape(scale)
    workload = Workload(device, scale, config, seed, dtype, rounding)
    managed, plain = parameter_counts(workload.weights())
    info = dict(name=_device_name(device), copy_gbps=copy_gbps / 1e9, add_gbps=add_gbps / 1e9, scale=scale,
                weight_set=f"{layers} BERT layer(s) of width {dim}", params=managed + plain, managed=managed,
                train_config=config.describe(), threads=torch.get_num_threads() if device.type == "cpu" else None,
                unavailable={name: backends.unavailable_reason(name, device) for name in backends.BACKEND_NAMES
                             if name not in backends.available(device)})
    return info, workload


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
                python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                finished=False)
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
