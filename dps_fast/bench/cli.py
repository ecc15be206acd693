"""`dps-fast bench`'s command line: options, their checks, and the run.

Every option is checked before anything runs: a bad value, or options that
contradict each other, is an argparse usage error (exit 2) that names the
option."""
import argparse
import functools
import os

import torch

from .. import arguments, backends
from ..saved import SavedFileError, write_json
from .cases import SECTION_TITLES
from .report import format_table, load_result, plot
from .runner import run_bench
from .weights import DEFAULT_SCALE, TrainConfig, weight_set_params

# Peak bytes per weight-set parameter, about: weights and gradients, one
# row's optimizer state (moments and scores) and its baseline's moments.
PEAK_BYTES_PER_PARAM = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STATE_DTYPES = ("fp32", "bf16")  # of dps_fast.state_format.NAMES, those the kernels store


def _items(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def _names(choices, what):
    """An argparse type: a comma-separated list of `choices`, at least one, no repeats."""
    def parse(text):
        items = list(dict.fromkeys(_items(text)))
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            named = f"unknown {what} {', '.join(map(repr, unknown))}" if unknown else f"no {what} given"
            raise argparse.ArgumentTypeError(f"{named}; choose from {','.join(choices)}")
        return items
    return parse


def _devices(text):
    devices = [arguments.device(item) for item in _items(text) or [""]]
    for i, name in enumerate(devices):
        if name in devices[:i]:
            raise argparse.ArgumentTypeError(f"{name!r} is named twice")
    return devices


def _train_config(text):
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 6 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"takes six integers >= 1, LAYERS,DIM,HEADS,VOCAB,BATCH,SEQ; got {text!r}")
    config = TrainConfig(*values)
    if config.dim % config.heads:
        raise argparse.ArgumentTypeError(f"DIM ({config.dim}) must be a multiple of HEADS ({config.heads})")
    return config


def _saved_result(text):
    """An argparse type: a result that --json wrote, loaded and checked."""
    try:
        return load_result(text)
    except SavedFileError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser):
    parser.add_argument("--scale", type=arguments.number(float, 0, low_open=True), default=None,
                        help="weight set as a fraction of BERT-large's encoder (302M parameters; "
                             f"default {DEFAULT_SCALE['cpu']:.4g} on CPU, {DEFAULT_SCALE['cuda']:g} on CUDA)")
    parser.add_argument("--device", type=_devices, default=None,
                        help="comma-separated devices (default: cpu, and cuda when available)")
    parser.add_argument("--backends", type=_names(backends.BACKEND_NAMES, "backend"), default=None,
                        help=f"comma-separated subset of {','.join(backends.BACKEND_NAMES)} "
                             "(default: every one available)")
    parser.add_argument("--sections", type=_names(tuple(SECTION_TITLES), "section"), default=list(SECTION_TITLES),
                        help=f"comma-separated subset of {','.join(SECTION_TITLES)} (default: all)")
    parser.add_argument("--seconds", type=arguments.number(float, 0), default=1.0,
                        help="time spent per row after the minimum repetitions (default 1.0)")
    parser.add_argument("--min-reps", type=arguments.number(int, 1), default=3,
                        help="minimum timed repetitions per row (default 3)")
    parser.add_argument("--max-reps", type=arguments.number(int, 1), default=100,
                        help="maximum timed repetitions per row (default 100)")
    parser.add_argument("--warmup", type=arguments.number(int, 0), default=2,
                        help="untimed repetitions per row, at most (default 2)")
    parser.add_argument("--train", type=_train_config, default=None, metavar="LAYERS,DIM,HEADS,VOCAB,BATCH,SEQ",
                        help="encoder of the training-step rows (default: 4,256,4,1024,8,64 on CPU; "
                             "24,1024,16,30522,16,128 (BERT-large) on CUDA)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="parameters and gradients of every row (AdamW's moments follow them; default fp32)")
    parser.add_argument("--state-dtype", type=_names(STATE_DTYPES, "state format"), default=["fp32"],
                        help=f"comma-separated DPSAdamW state formats, a dps_fast row each, of "
                             f"{','.join(STATE_DTYPES)} (default fp32)")
    parser.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest",
                        help="DPSAdamW's rounding of bf16 parameters (default nearest)")
    parser.add_argument("--threads", type=arguments.number(int, 1), default=None,
                        help="CPU threads for torch (default: torch's choice, usually one per core)")
    parser.add_argument("--json", metavar="PATH", type=arguments.writable,
                        help="write the results as JSON (rewritten after every row, so a stopped run keeps its rows)")
    parser.add_argument("--plot", metavar="PATH", type=arguments.plot_path,
                        help="write a plot of time per call vs parameter count (runs a size sweep from 1M "
                             "parameters up to the weight set; needs matplotlib)")
    parser.add_argument("--from-json", metavar="PATH", type=_saved_result,
                        help="report (and plot) a saved JSON instead of running")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (a line per row on stderr instead)")
    parser.set_defaults(usage_error=parser.error)  # for the checks that involve several options


def _check(args):
    """The checks that involve several options (each option alone is checked by its type)."""
    if args.min_reps > args.max_reps:
        args.usage_error(f"--min-reps ({args.min_reps}) is more than --max-reps ({args.max_reps})")
    if args.from_json is not None:
        if args.json:
            args.usage_error("--json: nothing to write with --from-json (it reports a saved result)")
        return
    if args.json and args.plot and os.path.abspath(args.json) == os.path.abspath(args.plot):
        args.usage_error(f"--json and --plot name the same file ({args.json})")
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for name in args.backends or ():
        if all(backends.unavailable_reason(name, device) for device in devices):
            reasons = "; ".join(f"{device}: {backends.unavailable_reason(name, device)}" for device in devices)
            args.usage_error(f"--backends: {name!r} cannot run on any device of this run ({reasons})")
    for device in map(torch.device, devices):
        scale = args.scale if args.scale is not None else DEFAULT_SCALE.get(device.type, 1.0)
        need = weight_set_params(scale) * PEAK_BYTES_PER_PARAM
        have = _memory_bytes(device)
        if have is not None and need > have:
            args.usage_error(f"--scale {scale:g}: a weight set of {weight_set_params(scale) / 1e6:,.0f}M parameters "
                             f"needs about {need / 1e9:,.1f} GB on {device} "
                             f"({PEAK_BYTES_PER_PARAM} B per parameter); it has {have / 1e9:,.1f} GB")
    return devices


def _memory_bytes(device):
    """The device's memory in bytes, or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def run(args):
    devices = _check(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.from_json is not None:
        result = args.from_json
    else:
        timing = dict(min_reps=args.min_reps, max_reps=args.max_reps, seconds=args.seconds, warmup=args.warmup)
        result = run_bench(devices, args.scale, args.backends, tuple(args.sections), timing, args.train,
                           sweep=bool(args.plot), progress=False if args.no_progress else None,
                           on_row=functools.partial(write_json, args.json) if args.json else None,
                           dtype=DTYPES[args.dtype], state_dtypes=tuple(args.state_dtype), rounding=args.rounding)
    print(format_table(result), flush=True)
    if args.json and args.from_json is None:
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
