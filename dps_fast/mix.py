"""DPS-Mix: the forward-side Mixout mixing of managed nn.Linear tensors.

In training mode a mixed nn.Linear computes with
    W_eff = ((1 - m) * target + m * W - p * target) / (1 - p)
where p is the group's sparsity and
  - exploration: target = W0 (the weights when attach() was called) and m a
    fresh Bernoulli(1 - p) draw per forward call: over the input features
    (columns) for a matrix, element-wise for a vector;
  - exploitation: target = W at the stage's first step and m = the DPS mask.
The gradient that reaches W is g_eff * m (without 1 / (1 - p), as published).
Evaluation (module.eval()) uses W itself.

All of it lives in the optimizer's per-parameter state, so optimizer
checkpoints cover it: "mix_init" (W0), "mix_snapshot" and "snapshot_stage",
"mix_count" (keep counts of the current exploration stage, per column for a
matrix) and, between backward and step, "mix_keep_sum" / "mix_calls".
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import selection
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


def mixed(optimizer, param):
    """The tensor a mixed module computes with in place of `param`."""
    group = optimizer._group_of(param, required=False)
    if param is None or group is None or not is_mixed(group):
        return param
    state = optimizer.state[param]
    sparsity = group["sparsity"]
    if optimizer._upcoming(group, with_stage=False)[0] == EXPLORE:
        shape = param.shape[-1:] if param.dim() == 2 else param.shape
        keep = torch.empty(shape, dtype=param.dtype, device=param.device).bernoulli_(1 - sparsity)
        return _Mix.apply(param, state["mix_init"], keep, sparsity, state, True)
    stage = optimizer._upcoming(group)[1]
    if state.get("snapshot_stage") != stage:
        state["mix_snapshot"] = param.detach().clone()
        state["snapshot_stage"] = stage
    optimizer._ensure_masks(group, [param], stage)
    bits = optimizer._current_mask(param, stage)
    if bits is None:  # not scored in the stage before: update densely, like the optimizer does
        keep = torch.ones_like(param)
    else:
        keep = selection.unpack_mask(bits, param.shape).to(param.dtype)
    return _Mix.apply(param, state["mix_snapshot"], keep, sparsity, state, False)


def _mixed_linear_forward(optimizer, module, input):
    if not module.training:
        return F.linear(input, module.weight, module.bias)
    return F.linear(input, mixed(optimizer, module.weight), mixed(optimizer, module.bias))


class MixHandle:
    """Returned by attach(); remove() restores the modules' own forward."""

    def __init__(self, modules):
        self.modules = modules

    def remove(self):
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.modules = []


def attach(optimizer, model):
    """Mix every nn.Linear of `model` whose weight or bias is in a variant="mix"
    group of `optimizer`; W0 is captured now."""
    modules = []
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        tensors = [t for t in (module.weight, module.bias) if t is not None]
        groups = [optimizer._group_of(t, required=False) for t in tensors]
        if not any(g is not None and is_mixed(g) for g in groups):
            continue
        if "forward" in module.__dict__:
            raise RuntimeError(f"{module} already has its forward replaced (attached twice?)")
        for tensor, group in zip(tensors, groups):
            if group is not None and is_mixed(group):
                optimizer.state[tensor].setdefault("mix_init", tensor.detach().clone())
        module.forward = functools.partial(_mixed_linear_forward, optimizer, module)
        modules.append(module)
    if not modules:
        raise ValueError("model has no nn.Linear whose weight or bias is in a variant='mix' group of this optimizer")
    return MixHandle(modules)


def check_mixed(optimizer, params):
    """Raise unless every param of a mix group went through a mixed backward."""
    for param in params:
        if "mix_calls" not in optimizer.state.get(param, {}):
            raise RuntimeError(
                f"a parameter of shape {tuple(param.shape)} is in a variant='mix' group but its gradient did "
                "not come through DPS-Mix mixing: call opt.attach_mix(model) before training, and manage "
                "only nn.Linear weights and biases with variant='mix'")


def accumulate_counts(optimizer, params, stage):
    """Exploration step: count += fraction of this step's forward calls that kept each entry."""
    for param in params:
        state = optimizer.state[param]
        keep = state["mix_keep_sum"] / state["mix_calls"]
        # a new tensor, not +=: a step that GradScaler skips restores the old one (dps_fast.amp)
        state["mix_count"] = keep if state.get("score_stage") != stage else state["mix_count"] + keep


def reset_keep(optimizer):
    """Forget keep masks of backward passes whose step is done or abandoned."""
    for state in optimizer.state.values():
        state.pop("mix_keep_sum", None)
        state.pop("mix_calls", None)
