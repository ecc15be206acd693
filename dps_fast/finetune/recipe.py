"""One fine-tuning run: the recipe, the bundled model, encoded data, train_run and evaluate."""
import copy
import math
import os
import time
from dataclasses import dataclass


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
    keep_fraction: float = 0.3  # ChildTuning q (its code's reserve_p)
    backend: str = "auto"  # DPSAdamW's backend (all methods but adamw)
    dtype: str = "fp32"  # the model's dtype: "bf16" holds it in bf16 (no autocast, no fp32 master copy)
    state_dtype: str = "fp32"  # DPSAdamW's state format (dps_fast.state_format)
    rounding: str = "nearest"  # how DPSAdamW stores bf16 parameters

    def total_steps(self, train_size):
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * math.ceil(train_size / self.batch_size)))

    def storage(self):
        """How the run stores the model and the optimizer's state: "" for fp32 training,
        else e.g. "bf16, stochastic, bf16 state" (report.setting)."""
        if (self.dtype, self.state_dtype, self.rounding) == ("fp32", "fp32", "nearest"):
            return ""
        return ", ".join([self.dtype, self.rounding] + ([f"{self.state_dtype} state"] if self.state_dtype != "fp32" else []))


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
    from ..data import model_dir

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

    def majority(self):
        """The accuracy of always predicting the most frequent label."""
        return max(map(self.labels.count, set(self.labels))) / len(self)

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
    made = 0
    while True:
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count, batch_size):
            if made == steps:
                return
            yield order[start: start + batch_size]
            made += 1


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

def train_run(base_model, train, dev, method, seed, recipe, device="cpu", on_step=None, eval_every=None, ood=None):
    """Fine-tune a copy of `base_model` on `train` (Encoded) with `method` and
    return a dict of results: dev accuracy on `dev` and its majority-class
    rate, seconds, ...

    eval_every: also evaluate on `dev` every that many steps; the result's
        "curve" lists [step, dev accuracy] pairs, the last one at the end.
    ood: {name: Encoded}: evaluate the final model on these sets too; the
        result's "ood" maps each name to {"accuracy", "majority"}.
    """
    import torch

    from ..baselines import build_optimizer
    from ..optimizer import DPSAdamW

    transformers = _transformers()
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    _init_head(model)
    model.to(device, torch.bfloat16 if recipe.dtype == "bf16" else torch.float32).train()
    steps = recipe.total_steps(len(train))
    start = time.perf_counter()
    fisher_batches = None
    if method == "childtuning-d":  # one pass over the training data, in order
        fisher_batches = [
            (lambda idx=list(range(i, min(i + recipe.batch_size, len(train)))): model(**train.batch(idx, device)).loss)
            for i in range(0, len(train), recipe.batch_size)]
    optimizer, clip = build_optimizer(
        method, model, steps, recipe.lr, weight_decay=recipe.weight_decay, sparsity=recipe.sparsity,
        stage_ratio=recipe.stage_ratio, keep_fraction=recipe.keep_fraction, fisher_batches=fisher_batches,
        max_grad_norm=recipe.max_grad_norm, backend=recipe.backend, state_dtype=recipe.state_dtype,
        rounding=recipe.rounding)
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
            on_step(losses[-1])
        if eval_every and step % eval_every == 0 and step < steps:
            tick = time.perf_counter()
            curve.append([step, evaluate(model, dev, device)])
            seconds_curve += time.perf_counter() - tick
    seconds = time.perf_counter() - start - seconds_curve
    accuracy = evaluate(model, dev, device)
    extra = {}
    if eval_every:
        extra["curve"] = curve + [[steps, accuracy]]
    if ood:
        extra["ood"] = {name: dict(accuracy=evaluate(model, data, device), majority=data.majority())
                        for name, data in ood.items()}
    if recipe.storage():
        extra["storage"] = recipe.storage()
    tail = losses[-max(1, len(losses) // 10):]
    return dict(method=method, seed=seed, lr=recipe.lr, epochs=None if recipe.steps else recipe.epochs, steps=steps,
                dev_accuracy=accuracy, majority=dev.majority(), **extra, train_loss=sum(tail) / len(tail),
                stage_steps=optimizer.param_groups[0]["stage_steps"] if isinstance(optimizer, DPSAdamW) else None,
                seconds=seconds, seconds_eval=time.perf_counter() - start - seconds)
