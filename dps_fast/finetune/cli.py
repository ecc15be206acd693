"""`dps-fast finetune`: the options, their checks (all before any model is
loaded), and the command that runs or reloads a study and prints its tables."""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict

from .. import arguments
from ..arguments import number
from ..baselines import METHODS
from ..data import OOD, OOD_TASK, TASKS
from ..saved import SavedFileError, write_json
from .recipe import Recipe
from .report import DEGENERATE_MARGIN, load_runs, report

DPS_METHODS = ("dps", "dps-mix")  # the methods with a stage length T = int(steps * stage ratio)
DTYPES = ("fp32", "bf16")
STATE_DTYPES = ("fp32", "bf16", "8bit")  # dps_fast.state_format.NAMES, without importing torch for --help
ROUNDINGS = ("nearest", "stochastic")


# ----- option types: each names what it wants; argparse adds the flag --------------

POSITIVE_INT = number(int, 1)
POSITIVE = number(float, 0, low_open=True)


class _ListAction(argparse.Action):
    """Comma-separated and/or repeated values, each parsed by `item_type` and checked against `choices`."""

    def __init__(self, *args, item_type=str, item_choices=None, **kwargs):
        self.item_type, self.item_choices = item_type, item_choices
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest) or []) if getattr(namespace, self.dest) is not self.default else []
        for text in values.split(","):
            text = text.strip()
            if self.item_choices and text == "all":
                items += list(self.item_choices)
                continue
            try:
                item = self.item_type(text)
            except (ValueError, argparse.ArgumentTypeError) as error:
                parser.error(f"argument {option_string}: {error if str(error) else f'invalid value {text!r}'}")
            if self.item_choices and item not in self.item_choices:
                parser.error(f"argument {option_string}: {text!r} is not one of {', '.join(self.item_choices)} "
                             "(or all)")
            items.append(item)
        setattr(namespace, self.dest, list(dict.fromkeys(items)))


def add_arguments(parser):
    from ..backends import CHOICES

    default = Recipe()
    parser.set_defaults(usage_error=parser.error)
    parser.add_argument("--task", action=_ListAction, item_choices=tuple(TASKS), default=["trec"],
                        help="mr, trec, or both (comma list; default trec)")
    parser.add_argument("--method", action=_ListAction, item_choices=METHODS, default=["adamw", "dps"],
                        help=f"comma list or repeated, from {', '.join(METHODS)}, or all (default adamw,dps)")
    parser.add_argument("--seeds", type=POSITIVE_INT, default=1, help="number of seeds per method (default 1)")
    parser.add_argument("--first-seed", type=number(int, 0), default=0,
                        help="seeds are first-seed .. first-seed + seeds - 1 (default 0): split a study in parts")
    parser.add_argument("--train-size", action=_ListAction, item_type=POSITIVE_INT, default=[1000],
                        help="training examples (comma list; default 1000); a fixed subset")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--epochs", action=_ListAction, item_type=POSITIVE, default=[default.epochs],
                       help="epochs (comma list; default 3)")
    group.add_argument("--steps", action=_ListAction, item_type=POSITIVE_INT, default=None,
                       help="optimizer steps (comma list; instead of --epochs)")
    parser.add_argument("--lr", action=_ListAction, item_type=POSITIVE, default=[default.lr],
                        help="learning rate of every method (comma list: a setting per rate; default 5e-5)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=default.batch_size, help="default 16")
    parser.add_argument("--max-length", type=number(int, 3), default=None,
                        help="tokens, [CLS] and [SEP] included (default: mr 64, trec 48)")
    parser.add_argument("--sparsity", type=number(float, 0, 1, high_open=True), default=default.sparsity,
                        help="DPS p and Mixout mixing probability, in [0, 1) (default 0.3)")
    parser.add_argument("--stage-ratio", type=number(float, 0, 1, low_open=True), default=default.stage_ratio,
                        help="DPS T = int(steps * ratio), ratio in (0, 1] (default 0.05)")
    parser.add_argument("--keep-fraction", "--reserve", dest="keep_fraction",
                        type=number(float, 0, 1, low_open=True),
                        default=default.keep_fraction,
                        help="ChildTuning q, the fraction updated, in (0, 1] (default 0.3; --reserve: its code's name)")
    parser.add_argument("--backend", choices=CHOICES, default=default.backend,
                        help="DPSAdamW backend of every method but adamw (default auto)")
    parser.add_argument("--dtype", choices=DTYPES, default=default.dtype,
                        help="the model's dtype: bf16 holds it in bf16, no autocast, no fp32 copy (default fp32)")
    parser.add_argument("--state-dtype", choices=STATE_DTYPES, default=default.state_dtype,
                        help="DPSAdamW's state: fp32, bf16 with stochastic rounding, or 8bit (block-wise 8-bit moments; "
                             "backend torch only so far) (default fp32)")
    parser.add_argument("--rounding", choices=ROUNDINGS, default=default.rounding,
                        help="how DPSAdamW stores bf16 parameters (default nearest); with --dtype bf16, --state-dtype "
                             "bf16 or --rounding stochastic, adamw is DPSAdamW's plain AdamW with that storage")
    parser.add_argument("--dev-size", type=POSITIVE_INT, default=None,
                        help="dev examples: a prefix of the task's fixed dev set (default all: mr 1000, trec 500)")
    parser.add_argument("--eval-every", type=number(float, 0, 1, low_open=True), default=None, metavar="FRACTION",
                        help="also evaluate on the dev set every FRACTION of the steps (e.g. 0.1): a dev curve")
    parser.add_argument("--ood", action=_ListAction, item_choices=tuple(OOD), default=[],
                        help=f"with --task {OOD_TASK}: also evaluate the final model on these other-domain "
                             f"sentiment sets ({', '.join(OOD)}, or all)")
    parser.add_argument("--ood-size", type=POSITIVE_INT, default=None,
                        help="examples of each --ood set: a prefix of its fixed shuffle (default all)")
    parser.add_argument("--degenerate-margin", type=number(float, 0), default=DEGENERATE_MARGIN, metavar="POINTS",
                        help="a run is degenerate below the majority-class rate + POINTS (default 2)")
    parser.add_argument("--device", type=arguments.device, default=None,
                        help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", type=arguments.writable,
                        help="write every run's result here (rewritten after each run)")
    parser.add_argument("--plot", metavar="PNG", type=arguments.plot_path,
                        help="draw dev accuracy per setting: over training with --eval-every, else per method and seed")
    parser.add_argument("--load", metavar="JSON", nargs="+",
                        help="no training: tabulate (and --plot) the runs saved in these --json files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ----- checks: everything that can be known before a model is loaded ----------------

def _default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _stage_hint(task, size, recipe, steps):
    """Why DPS has no stage in this setting, and which options give it one."""
    from ..schedule import stage_steps_from

    ratio = recipe.stage_ratio
    need = math.ceil(1 / ratio)  # the fewest steps with T >= 1, up to rounding
    while stage_steps_from(need, ratio) < 1:
        need += 1
    while need > 1 and stage_steps_from(need - 1, ratio) >= 1:
        need -= 1
    where = f"{task}, {size} training examples, " + (
        f"--steps {steps}" if recipe.steps is not None else f"--epochs {recipe.epochs:g} at batch {recipe.batch_size}")
    return (f"--stage-ratio {ratio:g} gives DPS a stage length T = int({steps} * {ratio:g}) = 0 steps ({where}): "
            f"give at least {need} steps (--steps, or more --epochs or --train-size) or --stage-ratio >= "
            f"{1 / steps:.3g}")


def check(args):
    """Check every option against the others and the bundled data before any
    model is loaded or run starts; an error exits with status 2 naming the
    option. Returns (recipes, device)."""
    from ..data import MissingPackage, load_ood, model_dir, pool_size
    from ..schedule import stage_steps_from

    error = args.usage_error
    if args.load:
        if args.json:
            error("argument --json: --load does not train; it only tabulates (and --plot draws) saved runs")
        try:
            args.loaded_runs = load_runs(args.load)  # read once, here: run() tabulates these
        except SavedFileError as failure:
            error(f"argument --load: {failure}")
        return [], None
    if args.first_seed + args.seeds > 2 ** 63:
        error("argument --first-seed: the seeds must stay below 2**63")
    if args.ood and args.task != [OOD_TASK]:
        error(f"argument --ood: the out-of-domain sets are sentiment: use them with --task {OOD_TASK} only")
    if args.ood_size is not None and not args.ood:
        error("argument --ood-size: give --ood too")
    budgets = [dict(steps=s) for s in args.steps] if args.steps else [dict(epochs=e) for e in args.epochs]
    recipes = [Recipe(lr=lr, batch_size=args.batch_size, max_length=args.max_length, sparsity=args.sparsity,
                      stage_ratio=args.stage_ratio, keep_fraction=args.keep_fraction, backend=args.backend,
                      dtype=args.dtype, state_dtype=args.state_dtype, rounding=args.rounding, **budget)
               for lr in args.lr for budget in budgets]
    try:
        for task in args.task:
            full_dev = TASKS[task]["dev_size"]
            if args.dev_size is not None and args.dev_size > full_dev:
                error(f"argument --dev-size: {task} has {full_dev} dev examples; got {args.dev_size}")
            pool = pool_size(task)
            for size in args.train_size:
                if size > pool:
                    error(f"argument --train-size: {task} has {pool} training examples; got {size}")
                for recipe in recipes:
                    steps = recipe.total_steps(size)
                    if set(args.method) & set(DPS_METHODS) and stage_steps_from(steps, recipe.stage_ratio) < 1:
                        error(_stage_hint(task, size, recipe, steps))
        for name in args.ood:
            count = len(load_ood(name)[0])
            if args.ood_size is not None and args.ood_size > count:
                error(f"argument --ood-size: {name} has {count} examples; got {args.ood_size}")
        with open(model_dir() / "config.json") as f:
            positions = json.load(f)["max_position_embeddings"]
    except MissingPackage as failure:
        print(f"dps-fast finetune: {failure}", file=sys.stderr)
        raise SystemExit(2)
    if args.max_length is not None and args.max_length > positions:
        error(f"argument --max-length: the bundled model takes at most {positions} tokens; got {args.max_length}")
    device = args.device or _default_device()
    if args.backend != "auto" and set(args.method) - {"adamw"}:
        from ..backends import unavailable_reason

        reason = unavailable_reason(args.backend, device)
        if reason is not None:
            error(f"argument --backend: {args.backend!r} cannot run on {device} here: {reason}")
    if args.plot and args.json and os.path.abspath(args.plot) == os.path.abspath(args.json):
        error("argument --plot: the same path as --json")
    return recipes, device


# ----- running ----------------------------------------------------------------------

def command_line(args):
    """The command that repeats this study (training options only, all spelled out)."""
    words = ["dps-fast", "finetune"]
    for flag in ("task", "method", "seeds", "first_seed", "train_size", "steps", "epochs", "lr", "batch_size",
                 "max_length", "sparsity", "stage_ratio", "keep_fraction", "backend", "dtype", "state_dtype", "rounding",
                 "dev_size", "eval_every", "ood", "ood_size", "device", "threads"):
        value = getattr(args, flag)
        if value is None or value == [] or (flag == "epochs" and args.steps is not None):
            continue
        words += ["--" + flag.replace("_", "-"), ",".join(
            format(v, "g") if isinstance(v, float) else str(v) for v in (value if isinstance(value, list) else [value]))]
    return " ".join(words)


def _describe(recipes, device, threads):
    r = recipes[0]
    lrs = ", ".join(dict.fromkeys(f"{x.lr:g}" for x in recipes))
    budget = ", ".join(dict.fromkeys(f"{x.steps} steps" if x.steps else f"{x.epochs:g} epochs" for x in recipes))
    return (f"bundled all-MiniLM-L6-v2, device {device} ({threads} threads); lr {lrs} (each for every method), "
            f"batch {r.batch_size}, {budget}, warmup {r.warmup_ratio:.0%} + linear decay, weight decay "
            f"{r.weight_decay}, dropout {r.dropout}, clip {r.max_grad_norm}; DPS p={r.sparsity} "
            f"T=int({r.stage_ratio}*steps); ChildTuning q={r.keep_fraction}; Mixout p={r.sparsity}; "
            f"DPSAdamW backend {r.backend}; model {r.dtype}, state {r.state_dtype}, rounding {r.rounding}")


def run(args):
    recipes, device = check(args)
    if args.load:
        runs = args.loaded_runs
    else:
        import torch

        from .study import run_study

        if args.threads:
            torch.set_num_threads(args.threads)
        print(_describe(recipes, device, torch.get_num_threads()), flush=True)
        start = time.perf_counter()
        header = dict(command=command_line(args), recipes=[asdict(r) for r in recipes], device=device,
                      threads=torch.get_num_threads())

        def save(runs):
            if args.json:
                write_json(args.json, {**header, "wall_seconds": round(time.perf_counter() - start), "runs": runs})

        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        runs = run_study(args.task, args.train_size, args.method, seeds, recipes, device,
                         progress=not args.no_progress, on_run=save, dev_size=args.dev_size,
                         eval_every=args.eval_every, ood=args.ood, ood_size=args.ood_size)
        print(f"wall time {time.perf_counter() - start:.0f} s")
    print(report(runs, args.degenerate_margin))
    if args.plot:
        from .plot import plot

        plot(runs, args.plot, args.degenerate_margin)
        print(f"plot: {args.plot}")
    return 0
