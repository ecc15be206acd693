"""Many runs: every (task, train size, recipe, seed, method), the model loaded once per task."""
import sys

from ..data import TASKS
from .recipe import Encoded, load_model, train_run


def eval_interval(eval_every, steps):
    """Steps between two dev evaluations for a fraction `eval_every` of `steps` (None: none)."""
    return None if eval_every is None else max(1, round(steps * eval_every))


def run_study(tasks, train_sizes, methods, seeds, recipes, device="cpu", progress=True, on_run=None, dev_size=None,
              eval_every=None, ood=(), ood_size=None):
    """Every (task, train size, recipe, seed, method), seeds outside methods
    so that a stopped study holds whole comparisons. Returns the run dicts.

    recipes: a Recipe or a list of them (e.g. one per learning rate).
    eval_every: a fraction of each run's steps: evaluate on the dev set that often.
    ood: names of data.OOD sets (their labels are MR's) to evaluate the final
        model on, `ood_size` examples of each (default all).
    """
    from tqdm.auto import tqdm

    from ..data import load_ood, load_split

    recipes = [recipes] if not isinstance(recipes, (list, tuple)) else list(recipes)
    plan = []
    for task in tasks:
        for size in train_sizes:
            split = load_split(task, size, dev_size)
            plan.append((task, size, split, [(r, r.total_steps(len(split.train_labels))) for r in recipes]))
    total = sum(steps for *_, runs in plan for _, steps in runs) * len(seeds) * len(methods)
    ood_texts = {name: load_ood(name, ood_size) for name in ood}
    runs, models = [], {}
    with tqdm(total=total, unit="step", disable=None if progress else True, dynamic_ncols=True) as bar:
        for task, size, split, settings in plan:
            for recipe, steps in settings:
                key = task, recipe.dropout  # the model depends on the number of labels and the dropout only
                if key not in models:
                    models = {key: load_model(len(split.label_names), recipe.dropout)}  # one in memory at a time
                tokenizer, base = models[key]
                max_length = recipe.max_length or TASKS[task]["max_length"]
                train = Encoded(tokenizer, split.train_texts, split.train_labels, max_length)
                dev = Encoded(tokenizer, split.dev_texts, split.dev_labels, max_length)
                ood_sets = {name: Encoded(tokenizer, *texts_labels, max_length)
                            for name, texts_labels in ood_texts.items()}
                for seed in seeds:
                    for method in methods:
                        bar.set_description(f"{task} n={len(train)} lr={recipe.lr:g} {method} seed {seed}")

                        def on_step(loss):
                            bar.update(1)
                            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

                        result = dict(task=task, train_size=len(train), dev_size=len(dev), max_length=max_length,
                                      **train_run(base, train, dev, method, seed, recipe, device, on_step,
                                                  eval_interval(eval_every, steps), ood_sets))
                        runs.append(result)
                        ood_text = "".join(f", {name} {100 * r['accuracy']:.2f}%"
                                           for name, r in result.get("ood", {}).items())
                        bar.write(f"{task} n={result['train_size']} lr={recipe.lr:g} steps={steps} {method:<13} "
                                  f"seed {seed}: dev accuracy {100 * result['dev_accuracy']:.2f}%{ood_text}  "
                                  f"({result['seconds']:.0f} s)", file=sys.stdout)
                        if on_run is not None:
                            on_run(runs)
    return runs
