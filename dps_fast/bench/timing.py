"""How the bench times: repetitions of a prepared call (CUDA events on a
GPU, the host clock on a CPU), optionally alternated with a baseline so that
a drift of the machine's load hits both alike, and the copy bandwidth that
"% copy" divides by."""
import statistics
import time

import torch

from .bytes_model import COPY_FACTOR
from .cases import Prepared


def sync(device):
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
    """Memory bandwidth of a large tensor (far beyond the caches), bytes per
    second: (copy, in-place add). copy: target.copy_(source) counted as
    COPY_FACTOR = 2 x bytes, the usual convention (the reference of "% copy");
    in-place add: a.add_(b) counted as 3 x bytes. On a CPU a copy also reads
    the target's lines before writing them (write-allocate), which in-place
    updates such as AdamW's do not pay, so they can exceed 100% of the copy
    figure; the add figure is the closer ceiling for them."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    source = torch.ones(nbytes // 4, device=device)
    target = torch.zeros_like(source)
    rates = []
    copy, add = (lambda: target.copy_(source)), (lambda: target.add_(source))
    for run, moved in ((copy, COPY_FACTOR * nbytes), (add, 3 * nbytes)):
        times, _ = measure(Prepared(run=run), device, min_reps=reps, max_reps=reps, warmup=3)
        rates.append(moved / statistics.median(times))
    return tuple(rates)
