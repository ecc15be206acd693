"""The cases of the update-throughput benchmark (`dps-fast bench` and the
pytest-benchmark suite in benchmarks/ share them): what each row times, and
how it is built.

A case names what is timed; prepare(case, workload) builds it on the
workload's tensors (weights.py) and returns a Prepared: run() is the timed
call, setup() (untimed) puts the optimizer back where run() expects it (same
stage, same step), so every repetition does the same work. Backends are taken
from dps_fast.backends.available(device), so a new backend appears here
without edits.

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

The bytes each row moves: bytes_model.py.
"""
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import backends, state_format
from ..groups import param_groups
from ..optimizer import DPSAdamW
from ..published import PublishedDPS
from ..tiny import TinyEncoder
from . import bytes_model
from .weights import parameter_counts

# The sections of the bench, in table order: what their rows time.
SECTION_TITLES = {"step": "optimizer step", "boundary": "stage boundary (selection)", "train": "whole training step",
                  "memory": "optimizer state memory"}  # memory: bench/memory.py
SPARSITY = 0.3
# A stage far longer than any run, so that repetitions never leave it.
STAGE_STEPS = 10**9


@dataclass(frozen=True)
class Case:
    """What one row times. section: "step", "boundary" or "train"; method: whose
    optimizer; operation: what of it ("dense" AdamW, "explore", "exploit",
    "exploit freeze", "select"; a row's "phase" column)."""
    device: str
    section: str
    method: str
    operation: str
    backend: Optional[str] = None  # the dps_fast backend, for dps_fast rows
    state_dtype: str = "fp32"  # DPSAdamW's state format (dps_fast.state_format), for dps_fast rows

    @property
    def id(self):
        return f"{self.device}-{self.section}-{self.method}-{self.operation}".replace(" ", "_")


@dataclass
class Prepared:
    run: Callable[[], None]
    setup: Optional[Callable[[], None]] = None
    timed_params: int = 0            # parameters one run() processes (the managed ones for a selection)
    bytes_moved: Optional[float] = None  # the bytes model for one run()
    state_bytes: Optional[int] = None    # persistent optimizer state, all tensors
    model_params: int = 0            # parameters of the model (for state bytes per parameter)
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


def dps_label(backend, state_dtype="fp32"):
    """The method label of a dps_fast row: "dps_fast[cpu]", "dps_fast[cpu] bf16 state"."""
    return f"dps_fast[{backend}]" + ("" if state_dtype == "fp32" else f" {state_dtype} state")


def cases(device, backend_names=None, sections=tuple(SECTION_TITLES), adamw=None, state_dtypes=("fp32",)):
    """Every case for `device`, in table order. backend_names: the dps_fast
    backends to include (default: all available on `device`); state_dtypes: the
    state formats of the dps_fast rows (each backend gets a row per format)."""
    device = str(torch.device(device))
    names = backends.available(device)
    if backend_names is not None:
        names = [n for n in names if n in backend_names]
    adamw = adamw_variants(device) if adamw is None else adamw
    dps = [(name, state) for name in names for state in state_dtypes]
    out = []
    if "step" in sections:
        out += [Case(device, "step", label, "dense") for label in adamw]
        out += [Case(device, "step", "published DPS", phase) for phase in ("explore", "exploit")]
        for name, state in dps:
            out += [Case(device, "step", dps_label(name, state), phase, name, state)
                    for phase in ("explore", "exploit", "exploit freeze")]
    if "boundary" in sections:
        out.append(Case(device, "boundary", "published DPS", "select"))
        out += [Case(device, "boundary", dps_label(name, state), "select", name, state) for name, state in dps]
    if "train" in sections:
        out += [Case(device, "train", label, "dense") for label in ("AdamW default", "AdamW fused")
                if label == "AdamW default" or label in adamw]
        out += [Case(device, "train", "published DPS", phase) for phase in ("explore", "exploit")]
        for name, state in dps:
            out += [Case(device, "train", dps_label(name, state), phase, name, state)
                    for phase in ("explore", "exploit")]
    return out


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
        else:  # the scores as this state format stores them
            score_dtype = state_format.of(case.state_dtype).score_dtype
            scores = [(p.grad.float() ** 2).to(score_dtype) for p in model.parameters() if p.dim() == 2]
            select = backends.resolve(case.backend, workload.device).select_masks
            prepared = Prepared(run=lambda: select(scores, SPARSITY))
        prepared.timed_params, prepared.model_params = managed, params
        prepared.bytes_moved = bytes_model.select_bytes(managed)
        return prepared
    state_bytes = workload.dtype.itemsize  # torch.optim.AdamW keeps its moments in the parameter's dtype
    if case.method.startswith("AdamW"):
        optimizer = torch.optim.AdamW(_groups(model, False), **adamw_variants(workload.device)[case.method])
        optimizer.step()  # creates the state
        prepared = Prepared(run=optimizer.step, state_bytes=_state_bytes(optimizer.state))
    elif case.method == "published DPS":
        prepared = _published_step(model, case.operation)
    else:
        state_bytes = state_format.of(case.state_dtype).dtype.itemsize
        optimizer = DPSAdamW(_groups(model), stage_steps=STAGE_STEPS, backend=case.backend,
                             masked="freeze" if case.operation == "exploit freeze" else "grad",
                             state_dtype=case.state_dtype, rounding=workload.rounding)
        optimizer.step()  # step 1: state and scores
        start = 1 if case.operation == "explore" else STAGE_STEPS  # next: step 2, or step T + 1 (selects)
        _set_dps_step(optimizer, start)
        optimizer.step()
        prepared = Prepared(run=optimizer.step, setup=lambda: _set_dps_step(optimizer, start),
                            state_bytes=_state_bytes(optimizer.state))
    prepared.timed_params, prepared.model_params = params, params
    prepared.bytes_moved = bytes_model.step_bytes(managed, plain, case.operation, workload.dtype.itemsize,
                                                  state_bytes)
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
                        classes=2, length=config.seq).to(device, workload.dtype)
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
        start = 1 if case.operation == "explore" else STAGE_STEPS  # step 2 of stage 1, or stage 2
        if case.method == "published DPS":
            optimizer = PublishedDPS(model, _groups(model), sparsity=SPARSITY, stage_steps=STAGE_STEPS)
            states, close = (optimizer.optimizer.state, optimizer.state), optimizer.remove

            def setup():
                optimizer.steps = start
        else:
            optimizer = DPSAdamW(_groups(model), stage_steps=STAGE_STEPS, backend=case.backend,
                                 state_dtype=case.state_dtype, rounding=workload.rounding)
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
    return Prepared(run=run, setup=setup, close=close, timed_params=count, model_params=count,
                    state_bytes=sum(_state_bytes(s) for s in states))
