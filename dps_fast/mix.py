"""DPS-Mix: the forward-side Mixout mixing of managed nn.Linear and
nn.MultiheadAttention tensors.

In training mode a mixed module computes with
    W_eff = ((1 - m) * target + m * W - p * target) / (1 - p)
where p is the group's sparsity and
  - exploration: target = W0 (the weights when attach() was called) and m a
    fresh Bernoulli(1 - p) draw per forward call: over the input features
    (columns) for a matrix, element-wise for a vector;
  - exploitation: target = W at the stage's first step and m = the DPS mask.
The gradient that reaches W is g_eff * m (without 1 / (1 - p), as published).
Evaluation (module.eval()) uses W itself.

attach() replaces each mixed module's forward on the instance by one that
runs the module's own forward (its class's, or what was set on the instance
before) with W_eff in place of the parameters, so subclasses and hooks keep
their behaviour; MixHandle.remove() (or DPSAdamW.detach_mix) gives it back.
A managed tensor that no mixed forward used in a step (zero gradient) keeps
nothing in the counts; a nonzero gradient without a mixed backward is an
error that says why (eval mode, or never attached).

All of it lives in the optimizer's per-parameter state, so optimizer
checkpoints cover it: "mix_init" (W0), "mix_snapshot" and "snapshot_stage",
"mix_count" (keep counts of the current exploration stage, per column for a
matrix) and, between backward and step, "mix_keep_sum" / "mix_calls".
"""
import contextlib
import functools
import warnings

import torch
from torch import nn

from . import selection
from .param_state import mix_count_shape
from .schedule import EXPLORE


class _Mix(torch.autograd.Function):
    """W_eff from (W, target, keep); backward passes g_eff * keep to W and,
    in exploration, adds keep to the parameter's keep accumulator."""

    @staticmethod
    def forward(ctx, weight, target, keep, sparsity, state, explore):
        ctx.save_for_backward(keep)
        ctx.state, ctx.explore = state, explore
        return ((1 - keep) * target + keep * weight - sparsity * target) / (1 - sparsity)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        record_keep(ctx.state, keep if ctx.explore else None)
        return grad * keep, None, None, None, None, None


def record_keep(state, keep):
    """Note one mixed backward pass of a parameter (with its keep mask when exploring)."""
    state["mix_calls"] = state.get("mix_calls", 0) + 1
    if keep is not None:
        keep = keep.float()
        if "mix_keep_sum" in state:
            state["mix_keep_sum"] += keep
        else:
            state["mix_keep_sum"] = keep.clone()


def is_mixed(group):
    return group["dps"] and group["variant"] == "mix"


def effective_tensor(optimizer, param):
    """W_eff: the tensor a mixed module computes with in place of `param` (param itself
    if it is in no mix group)."""
    group = optimizer.group_of(param, required=False)
    if param is None or group is None or not is_mixed(group):
        return param
    state = optimizer.state[param]
    sparsity = group["sparsity"]
    # the phase first, the stage only when exploiting: asking for the stage at a stage boundary
    # reads a GradScaler's found_inf, and with Mixout every step is a new stage (dps_fast.amp)
    if optimizer.upcoming(group, with_stage=False).phase == EXPLORE:
        keep = torch.empty(mix_count_shape(param), dtype=param.dtype, device=param.device).bernoulli_(1 - sparsity)
        return _Mix.apply(param, state["mix_init"], keep, sparsity, state, True)
    stage = optimizer.upcoming(group).stage
    take_snapshots(optimizer, [param], stage)
    optimizer.make_masks(group, [param], stage)
    bits = optimizer.stage_mask(param, stage)
    if bits is None:  # not scored in the stage before: update densely, like the optimizer does
        keep = torch.ones_like(param)
    else:
        keep = selection.unpack_mask(bits, param.shape).to(param.dtype)
    return _Mix.apply(param, state["mix_snapshot"], keep, sparsity, state, False)


def take_snapshots(optimizer, params, stage):
    """The exploitation target of `params` for `stage`: W as the stage begins (taken by
    the first mixed forward of the stage, or by the stage's first step() for a tensor
    no forward used before it: both before any update of the stage)."""
    for param in params:
        state = optimizer.state[param]
        if state.get("snapshot_stage") != stage:
            state["mix_snapshot"] = param.detach().clone()
            state["snapshot_stage"] = stage


# The modules DPS-Mix can mix, and the tensors of each whose forward it replaces.
# nn.MultiheadAttention computes with its out_proj's weight and bias without calling
# out_proj.forward, so its wrapper mixes those too (and out_proj is not wrapped alone).
_MIXED_NAMES = {nn.MultiheadAttention: ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                                        "v_proj_weight", "out_proj.weight", "out_proj.bias"),
                nn.Linear: ("weight", "bias")}


def _mixed_tensors(module):
    """{name: parameter} of the parameters `module`'s mixed forward computes with (None if
    DPS-Mix cannot mix `module`). A tensor that is not a registered parameter (a
    parametrized weight, computed from its originals) is not among them."""
    kind = next((kind for kind in _MIXED_NAMES if isinstance(module, kind)), None)
    if kind is None:
        return None
    tensors = {}
    for name in _MIXED_NAMES[kind]:
        owner_name, _, leaf = name.rpartition(".")
        tensor = module.get_submodule(owner_name)._parameters.get(leaf)
        if tensor is not None:
            tensors[name] = tensor
    return tensors


@contextlib.contextmanager
def _computing_with(module, tensors):
    """`module` (and its submodules) compute with `tensors` ({dotted name: tensor}) in
    place of those parameters until the block ends. Not torch.func.functional_call: that
    calls module(...), so the module's forward hooks would run a second time."""
    owners = {name: module.get_submodule(name.rpartition(".")[0]) for name in tensors}
    saved = {name: owners[name]._parameters[name.rpartition(".")[2]] for name in tensors}
    try:
        for name, tensor in tensors.items():
            owners[name]._parameters[name.rpartition(".")[2]] = tensor
        yield
    finally:
        for name, parameter in saved.items():
            owners[name]._parameters[name.rpartition(".")[2]] = parameter


@torch.compiler.disable  # run eagerly under torch.compile: the mixing keeps state in the optimizer
def _mixed_forward(optimizer, module, previous, *args, **kwargs):
    """The module's own forward (`previous`, an instance forward set before attach such as
    a hook's, else its class's), on W_eff in training mode and on its parameters in eval mode."""
    def own_forward():
        return previous(*args, **kwargs) if previous is not None else type(module).forward(module, *args, **kwargs)

    if not module.training:
        return own_forward()
    with _computing_with(module, {name: effective_tensor(optimizer, tensor)
                                  for name, tensor in _mixed_tensors(module).items()}):
        return own_forward()


def _mixing(module):
    """The partial of _mixed_forward that is `module`'s forward, or None."""
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, functools.partial) and forward.func is _mixed_forward else None


def _unmix(module):
    """Give `module` back the forward it had before it was mixed."""
    previous = module.__dict__.pop("forward").args[2]
    if previous is not None:
        module.forward = previous


class MixHandle:
    """Returned by attach(); remove() gives the modules back the forward they had."""

    def __init__(self, optimizer, modules):
        self.optimizer = optimizer
        self.modules = modules

    def remove(self):
        for module in self.modules:
            mixing = _mixing(module)
            if mixing is None or mixing.args[0] is not self.optimizer:
                warnings.warn(f"{type(module).__name__}'s forward was replaced after attach_mix; that "
                              "replacement is left as it is (and may still mix)", stacklevel=2)
                continue
            _unmix(module)
        self.modules = []
        if self in self.optimizer._mix_handles:
            self.optimizer._mix_handles.remove(self)


def attach(optimizer, model):
    """Mix every nn.Linear and nn.MultiheadAttention of `model` (subclasses included:
    their own forward runs, on the mixed tensors) that holds a tensor of a variant="mix"
    group of `optimizer`; W0 is captured now. A tensor of such a group that no such
    module holds (e.g. GPT-2's Conv1D, which stores its weight transposed, a custom
    layer, or a parametrized weight's original) is a ValueError: it could not be mixed."""
    mixed_params = {id(p): p for g in optimizer.param_groups if is_mixed(g) for p in g["params"]}
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    modules, covered = [], set()
    for name, module in model.named_modules():
        tensors = _mixed_tensors(module)
        if tensors is None or id(module) in inside_attention:
            continue
        chosen = [t for t in tensors.values() if id(t) in mixed_params]
        if not chosen:
            continue
        mixing = _mixing(module)
        if mixing is not None:
            owner = mixing.args[0]
            raise RuntimeError(
                f"{name or type(module).__name__} ({type(module).__name__}) is already mixed by "
                f"{'this' if owner is optimizer else 'another'} DPSAdamW (attach_mix called twice, or an "
                "earlier run's mixing not removed): call remove() on the handle attach_mix returned, or "
                "detach_mix() on that optimizer, first")
        modules.append(module)
        covered.update(map(id, chosen))
    names = {id(p): n for n, p in model.named_parameters()}
    left = [names[i] for i in mixed_params if i not in covered and i in names]
    if left:
        raise ValueError(f"variant='mix' can mix only the weights and biases of nn.Linear and nn.MultiheadAttention "
                         f"(it runs their forward on mixed tensors); these tensors of a mix group are in other "
                         f"modules, or are the originals of a parametrized weight: {', '.join(left[:10])}. Put "
                         "them in a group with variant='dense'.")
    if not modules:
        raise ValueError("model has no nn.Linear or nn.MultiheadAttention whose tensors are in a variant='mix' "
                         "group of this optimizer")
    for module in modules:
        for tensor in _mixed_tensors(module).values():
            if id(tensor) in mixed_params:
                optimizer.state[tensor].setdefault("mix_init", tensor.detach().clone())
        module.forward = functools.partial(_mixed_forward, optimizer, module, module.__dict__.get("forward"))
    handle = MixHandle(optimizer, modules)
    optimizer._mix_handles.append(handle)
    return handle


def mixes(optimizer, model):
    """Whether `optimizer`'s mixing is on a module of `model`."""
    return any((m := _mixing(module)) is not None and m.args[0] is optimizer for module in model.modules())


def detach(model):
    """Remove the DPS-Mix mixing of every module of `model`, whichever optimizer attached
    it (a copy of a mixed model included, whose optimizer copy holds no handle)."""
    for module in model.modules():
        mixing = _mixing(module)
        if mixing is not None:
            _unmix(module)
            for handle in mixing.args[0]._mix_handles:
                handle.modules = [m for m in handle.modules if m is not module]


def check_mixed(optimizer, params):
    """Raise unless every param of a mix group that has a nonzero gradient went through
    a mixed backward. A zero gradient without one is a tensor unused in this step (a
    head of another task, with zero_grad(set_to_none=False)): it is updated as its
    gradient says, and keeps nothing in the keep counts."""
    unmixed = [p for p in params if "mix_calls" not in optimizer.state.get(p, {})]
    if not unmixed:
        return
    # one device sync, in the steps that leave a tensor of a mix group unused (e.g. other heads)
    nonzero = torch.stack([p.grad.ne(0).any() for p in unmixed]).tolist()
    for param, used in zip(unmixed, nonzero):
        if used:
            raise RuntimeError(f"a parameter of shape {tuple(param.shape)} is in a variant='mix' group but its "
                               f"gradient did not come through DPS-Mix mixing: {_why_unmixed(optimizer, param)}")


def _why_unmixed(optimizer, param):
    for handle in optimizer._mix_handles:
        for module in handle.modules:
            if any(t is param for t in _mixed_tensors(module).values()):
                if not module.training:
                    return (f"its module ({type(module).__name__}) is in eval mode, where DPS-Mix computes with "
                            "the raw weights; call model.train() before the training forward pass")
                return (f"its module ({type(module).__name__}) is mixed, so the gradient was computed outside "
                        "that module's forward (e.g. F.linear on its weight)")
    return ("call opt.attach_mix(model) before training, and manage only the weights and biases of nn.Linear "
            "and nn.MultiheadAttention with variant='mix'")


def accumulate_counts(optimizer, params, stage):
    """Exploration step: count += fraction of this step's forward calls that kept each entry
    (none for a tensor no forward call used)."""
    for param in params:
        state = optimizer.state[param]
        if "mix_calls" in state:
            keep = state["mix_keep_sum"] / state["mix_calls"]
        else:
            keep = torch.zeros(mix_count_shape(param), device=param.device)
        # a new tensor, not +=: a step that GradScaler skips restores the old one (dps_fast.amp)
        state["mix_count"] = keep if state.get("score_stage") != stage else state["mix_count"] + keep


def reset_keep(optimizer):
    """Forget keep masks of backward passes whose step is done or abandoned."""
    for state in optimizer.state.values():
        if not isinstance(state, dict):  # an entry set by hand (opt.state["extra"] = 1), as torch allows
            continue
        state.pop("mix_keep_sum", None)
        state.pop("mix_calls", None)
