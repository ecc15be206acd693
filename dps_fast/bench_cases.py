"""The cases of the update-throughput benchmark (`dps-fast bench` and the
pytest-benchmark suite in benchmarks/ share them).

A case names what is timed; prepare(case, workload) builds it and returns a
Prepared: run() is the timed call, setup() (untimed) puts the optimizer back
where run() expects it (same stage, same step), so every repetition does the
same work. Backends are taken from dps_fast.backends.available(device), so a
new backend appears here without edits.

Weight set: a BERT-large-shaped list of tensors, 24 layers of query, key,
value, attention-output (1024x1024 + bias), intermediate (4096x1024 + bias),
output (1024x4096 + bias) and two LayerNorms (302.3M parameters), scaled by
`scale` (a fraction of that count): whole layers of width 1024 down to one
layer, then one narrower layer. Linear weights are managed by DPS (as in
dps_fast.param_groups); biases and LayerNorm are plain AdamW.

How each row is measured (optimizer-only rows use the same weights and
gradients; gradients stay fixed across repetitions):

- AdamW for-loop / foreach / fused: torch.optim.AdamW(...).step().
- dps_fast[NAME] explore / exploit / exploit freeze: DPSAdamW(backend=NAME)
  .step() with the group's step counter placed inside an exploration stage
  (scores accumulate) or an exploitation stage whose masks are already
  selected (so the exploit rows exclude selection); "freeze" is
  masked="freeze", the others masked="grad".
- dps_fast[NAME] boundary: backends.resolve(NAME, device).select_masks(scores,
  0.3) over every managed tensor (per-tensor k-th largest score, packed mask).
- published DPS (dps_fast.published.PublishedDPS, the published mechanism):
  its masking runs in autograd hooks, i.e. inside backward, so its step rows
  time what it adds per step: its gradient hook applied to every managed
  gradient (explore: score += g*g; exploit: g * bool mask) followed by its
  torch.optim.AdamW step (torch's default implementation: for-loop on CPU,
  foreach on CUDA). Its boundary row is its own selection: a full descending
  torch.sort of every managed tensor and a bool mask.
- training step: zero_grad, forward, cross-entropy, backward, gradient
  clipping to norm 1 and step() of a BERT-shaped encoder (dps_fast.tiny's
  TinyEncoder built from the config, random weights and tokens). DPS rows are
  placed inside a stage as above; published DPS runs with its hooks.

Bytes model (fp32, per entry, the minimum each update must move):
AdamW reads p, g, m, v and writes p, m, v: 28 B. Explore adds reading and
writing the score: 36 B for managed entries. Exploit adds one packed mask
bit: 28.125 B (whatever the semantics; "freeze" could in principle skip the
traffic of masked-out entries). Selection reads each score once and writes a
mask bit: 4.125 B per managed entry. Plain (unmanaged) entries count 28 B.
The same model is used for every implementation of a row's work, so GB/s
compares implementations of the same work and, against the copy bandwidth
measured in the same run (2 x bytes of a large tensor copy per second), shows
how close each gets to the memory-bound floor.
"""
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .tiny import Block, TinyEncoder
from .groups import param_groups
from .optimizer import DPSAdamW
from .published import PublishedDPS

ADAMW_BYTES = 28.0       # read p, g, m, v; write p, m, v (fp32)
SCORE_BYTES = 8.0        # explore: read and write the score
MASK_BYTES = 1 / 8       # exploit: one packed mask bit
SELECT_BYTES = 4 + 1 / 8  # boundary: read the score, write the mask bit

SPARSITY = 0.3
# A stage far longer than any run, so that repetitions never leave it.
STAGE_STEPS = 10**9

BERT_LARGE_LAYERS, BERT_LARGE_DIM = 24, 1024


def layer_params(dim):
    """Parameters of one BERT layer of width `dim` (FFN 4 * dim)."""
    return 12 * dim * dim + 13 * dim  # 4 dim^2 + 8 dim^2 weights; 9 dim biases; 2 LayerNorms


BERT_LARGE_PARAMS = BERT_LARGE_LAYERS * layer_params(BERT_LARGE_DIM)


def weight_shape(scale):
    """(layers, width) of the weight set holding about scale x BERT-large's encoder."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0; got {scale!r}")
    target = scale * BERT_LARGE_PARAMS
    if target >= layer_params(BERT_LARGE_DIM):
        return round(target / layer_params(BERT_LARGE_DIM)), BERT_LARGE_DIM
    dim = max(32, round(math.sqrt(target / 12) / 32) * 32)
    return 1, dim


def scale_for_params(count):
    """The scale whose weight set holds about `count` parameters."""
    return count / BERT_LARGE_PARAMS


def weight_set(scale, device, seed=0):
    """The weight set (an nn.ModuleList of BERT layers) with fixed random
    weights and gradients on `device`."""
    layers, dim = weight_shape(scale)
    with torch.device("meta"):
        model = nn.ModuleList(Block(dim, 1) for _ in range(layers))
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.05, 0.05, generator=generator)
            param.grad = torch.empty_like(param).normal_(0, 1e-3, generator=generator)
    return model


@dataclass(frozen=True)
class TrainConfig:
    """A BERT-shaped encoder for the whole-training-step rows."""
    layers: int
    dim: int
    heads: int
    vocab: int
    batch: int
    seq: int

    def describe(self):
        return (f"{self.layers} layers, width {self.dim}, {self.heads} heads, vocab {self.vocab}, "
                f"batch {self.batch} x seq {self.seq}")


# CPU: small enough for a 2-core machine (vocab cut so that embeddings are
# ~8% of the parameters, as in BERT-large); CUDA: BERT-large, batch 16 x 128
# as in the paper's recipe (fp32).
TRAIN_CPU = TrainConfig(layers=4, dim=256, heads=4, vocab=1024, batch=8, seq=64)
TRAIN_CUDA = TrainConfig(layers=24, dim=1024, heads=16, vocab=30522, batch=16, seq=128)


def default_train_config(device):
    return TRAIN_CUDA if torch.device(device).type == "cuda" else TRAIN_CPU


@dataclass(frozen=True)
class Case:
    """What one row times. section: "step", "boundary" or "train"."""
    device: str
    section: str
    method: str
    phase: str
    backend: Optional[str] = None  # the dps_fast backend, for dps_fast rows

    @property
    def id(self):
        return f"{self.device}-{self.section}-{self.method}-{self.phase}".replace(" ", "_")


@dataclass
class Prepared:
    run: Callable[[], None]
    setup: Optional[Callable[[], None]] = None
    entries: int = 0                 # parameters the row processes (managed only for selection)
    bytes_moved: Optional[float] = None  # the bytes model for one run()
    state_bytes: Optional[int] = None    # persistent optimizer state, all tensors
    params: int = 0                  # parameters of the model (for state bytes per parameter)
    close: Optional[Callable[[], None]] = None


@functools.lru_cache(maxsize=None)
def _adamw_variants(device):
    """torch.optim.AdamW implementations that run on `device`: label -> kwargs."""
    variants = {"AdamW for-loop": dict(foreach=False), "AdamW foreach": dict(foreach=True),
                "AdamW fused": dict(fused=True)}
    out = {}
    for label, kwargs in variants.items():
        param = torch.zeros(2, device=device, requires_grad=True)
        param.grad = torch.ones_like(param)
        try:
            torch.optim.AdamW([param], **kwargs).step()
        except (RuntimeError, TypeError, ValueError):
            continue
        out[label] = kwargs
    return out


def adamw_variants(device):
    """torch.optim.AdamW implementations that run on `device`: label -> kwargs."""
    return dict(_adamw_variants(str(torch.device(device))))


def cases(device, backend_names=None, sections=("step", "boundary", "train"), adamw=None):
    """Every case for `device`, in table order. backend_names: the dps_fast
    backends to include (default: all available on `device`)."""
    device = str(torch.device(device))
    names = backends.available(device)
    if backend_names is not None:
        names = [n for n in names if n in backend_names]
    adamw = adamw_variants(device) if adamw is None else adamw
    out = []
    if "step" in sections:
        out += [Case(device, "step", label, "dense") for label in adamw]
        out += [Case(device, "step", "published DPS", phase) for phase in ("explore", "exploit")]
        for name in names:
            out += [Case(device, "step", f"dps_fast[{name}]", phase, name)
                    for phase in ("explore", "exploit", "exploit freeze")]
    if "boundary" in sections:
        out.append(Case(device, "boundary", "published DPS", "select"))
        out += [Case(device, "boundary", f"dps_fast[{name}]", "select", name) for name in names]
    if "train" in sections:
        out += [Case(device, "train", label, "dense") for label in ("AdamW default", "AdamW fused")
                if label == "AdamW default" or label in adamw]
        out += [Case(device, "train", "published DPS", phase) for phase in ("explore", "exploit")]
        for name in names:
            out += [Case(device, "train", f"dps_fast[{name}]", phase, name) for phase in ("explore", "exploit")]
    return out


class Workload:
    """The tensors and models the cases of one device share, built on first use."""

    def __init__(self, device, scale, train_config=None, seed=0):
        self.device = torch.device(device)
        self.scale = scale
        self.train_config = train_config or default_train_config(self.device)
        self.seed = seed
        self._weights = None

    def weights(self):
        if self._weights is None:
            self._weights = weight_set(self.scale, self.device, self.seed)
        return self._weights

    def release(self):
        self._weights = None


def _state_bytes(*state_dicts):
    """Bytes of the tensors held in optimizer state dicts ({param: {name: value}})."""
    seen, total = set(), 0
    for states in state_dicts:
        for state in states.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                    seen.add(value.data_ptr())
                    total += value.numel() * value.element_size()
    return total


def _groups(model, dps_keys=True):
    groups = param_groups(model)
    return groups if dps_keys else [{k: v for k, v in g.items() if k != "dps"} for g in groups]


def parameter_counts(model):
    """(managed, plain) parameter counts as dps_fast.param_groups splits them."""
    managed = plain = 0
    for group in param_groups(model):
        count = sum(p.numel() for p in group["params"])
        if group.get("dps", True):
            managed += count
        else:
            plain += count
    return managed, plain


def step_bytes(managed, plain, phase):
    """The bytes model of one optimizer step (see the module docstring)."""
    extra = {"dense": 0.0, "explore": SCORE_BYTES, "exploit": MASK_BYTES, "exploit freeze": MASK_BYTES}[phase]
    return managed * (ADAMW_BYTES + extra) + plain * ADAMW_BYTES


def _set_dps_step(optimizer, step):
    for group in optimizer.param_groups:
        group["dps_step"] = step


def prepare(case, workload):
    """Build `case` on `workload`; returns a Prepared ready to time."""
    if case.section == "train":
        return _prepare_train(case, workload)
    model = workload.weights()
    managed, plain = parameter_counts(model)
    params = managed + plain
    if case.section == "boundary":
        if case.method == "published DPS":
            prepared = _published_boundary(model)
        else:
            scores = [p.grad * p.grad for p in model.parameters() if p.dim() == 2]
            select = backends.resolve(case.backend, workload.device).select_masks
            prepared = Prepared(run=lambda: select(scores, SPARSITY))
        prepared.entries, prepared.params = managed, params
        prepared.bytes_moved = managed * SELECT_BYTES
        return prepared
    if case.method.startswith("AdamW"):
        optimizer = torch.optim.AdamW(_groups(model, False), **adamw_variants(workload.device)[case.method])
        optimizer.step()  # creates the state
        prepared = Prepared(run=optimizer.step, state_bytes=_state_bytes(optimizer.state))
    elif case.method == "published DPS":
        prepared = _published_step(model, case.phase)
    else:
        optimizer = DPSAdamW(_groups(model), stage_steps=STAGE_STEPS, backend=case.backend,
                             masked="freeze" if case.phase == "exploit freeze" else "grad")
        optimizer.step()  # step 1: state and scores
        start = 1 if case.phase == "explore" else STAGE_STEPS  # next: step 2, or step T + 1 (selects)
        _set_dps_step(optimizer, start)
        optimizer.step()
        prepared = Prepared(run=optimizer.step, setup=lambda: _set_dps_step(optimizer, start),
                            state_bytes=_state_bytes(optimizer.state))
    prepared.entries, prepared.params = params, params
    prepared.bytes_moved = step_bytes(managed, plain, case.phase)
    return prepared


def _published(model):
    published = PublishedDPS(model, _groups(model), sparsity=SPARSITY, stage_steps=STAGE_STEPS)
    grads = [p.grad for p in published.managed]
    return published, grads


def _run_published_hooks(published, grads):
    """What the published gradient hooks do to each managed gradient during backward."""
    for param, grad in zip(published.managed, grads):
        hooked = published._hook(param, grad)
        param.grad = grad if hooked is None else hooked


def _published_step(model, phase):
    published, grads = _published(model)
    _run_published_hooks(published, grads)  # stage 1: scores
    published.step()
    published.steps = 1 if phase == "explore" else STAGE_STEPS  # stage 1, or stage 2 (selects once)
    _run_published_hooks(published, grads)
    published.step()
    start = published.steps - 1

    def run():
        _run_published_hooks(published, grads)
        published.step()

    def setup():
        published.steps = start

    def close():
        published.remove()
        for param, grad in zip(published.managed, grads):
            param.grad = grad

    return Prepared(run=run, setup=setup, close=close,
                    state_bytes=_state_bytes(published.optimizer.state, published.state))


def _published_boundary(model):
    published, grads = _published(model)
    _run_published_hooks(published, grads)  # stage 1: scores
    published.steps = STAGE_STEPS  # the first step of stage 2: selection on first use

    def run():
        for param in published.managed:
            published._current_mask(param)

    def setup():
        for param in published.managed:
            published.state[param]["mask_stage"] = None

    def close():
        published.remove()
        for param, grad in zip(published.managed, grads):
            param.grad = grad

    return Prepared(run=run, setup=setup, close=close)


def _prepare_train(case, workload):
    config, device = workload.train_config, workload.device
    torch.manual_seed(workload.seed)
    model = TinyEncoder(vocab=config.vocab, dim=config.dim, layers=config.layers, heads=config.heads,
                        classes=2, length=config.seq).to(device)
    tokens = torch.randint(0, config.vocab, (config.batch, config.seq), device=device)
    labels = torch.randint(0, 2, (config.batch,), device=device)
    params = [p for p in model.parameters()]

    def forward_backward():
        F.cross_entropy(model(tokens), labels).backward()

    if case.method.startswith("AdamW"):
        kwargs = {} if case.method == "AdamW default" else adamw_variants(device)[case.method]
        optimizer = torch.optim.AdamW(_groups(model, False), **kwargs)
        states, setup, close = (optimizer.state,), None, None

        def clip():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
    else:
        start = 1 if case.phase == "explore" else STAGE_STEPS  # step 2 of stage 1, or stage 2
        if case.method == "published DPS":
            optimizer = PublishedDPS(model, _groups(model), sparsity=SPARSITY, stage_steps=STAGE_STEPS)
            states, close = (optimizer.optimizer.state, optimizer.state), optimizer.remove

            def setup():
                optimizer.steps = start
        else:
            optimizer = DPSAdamW(_groups(model), stage_steps=STAGE_STEPS, backend=case.backend)
            states, close = (optimizer.state,), None

            def setup():
                _set_dps_step(optimizer, start)

        def clip():  # both clip the gradients the step applies (masked in exploitation stages)
            optimizer.clip_grad_norm_(1.0)

    def run():
        optimizer.zero_grad()
        forward_backward()
        clip()
        optimizer.step()

    run()  # step 1 (stage 1): state and scores created
    if setup is not None:
        setup()
        run()  # and, for exploit rows, the masks selected
    count = sum(p.numel() for p in params)
    return Prepared(run=run, setup=setup, close=close, entries=count, params=count,
                    state_bytes=sum(_state_bytes(s) for s in states))
