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
        shape = param.shape[-1:] if param.dim() == 2 else param.shape
        keep = torch.empty(shape, dtype=param.dtype, device=param.device).bernoulli_(1 - sparsity)
        return _Mix.apply(param, state["mix_init"], keep, sparsity, state, True)
    stage = optimizer.upcoming(group).stage
    if state.get("snapshot_stage") != stage:
        state["mix_snapshot"] = param.detach().clone()
        state["snapshot_stage"] = stage
    optimizer.make_masks(group, [param], stage)
    bits = optimizer.stage_mask(param, stage)
    if bits is None:  # not scored in the stage before: update densely, like the optimizer does
        keep = torch.ones_like(param)
    else:
        keep = selection.unpack_mask(bits, param.shape).to(param.dtype)
    return _Mix.apply(param, state["mix_snapshot"], keep, sparsity, state, False)


# The modules DPS-Mix can mix, and the tensors of each whose forward it replaces.
# nn.MultiheadAttention computes with its out_proj's weight and bias without calling
# out_proj.forward, so its wrapper mixes those too (and out_proj is not wrapped alone).
def _mixed_tensors(module):
    """{name: tensor} of the tensors `module`'s mixed forward computes with (None if
    DPS-Mix cannot mix `module`)."""
    if isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                 "out_proj.weight", "out_proj.bias"]
        tensors = {name: module.get_parameter(name) if "." in name else getattr(module, name) for name in names}
        return {name: t for name, t in tensors.items() if t is not None}
    if isinstance(module, nn.Linear):
        return {name: t for name, t in (("weight", module.weight), ("bias", module.bias)) if t is not None}
    return None


@torch.compiler.disable  # run eagerly under torch.compile: the mixing keeps state in the optimizer
def _mixed_forward(optimizer, module, *args, **kwargs):
    own_forward = type(module).forward
    if not module.training or module.__dict__.get("_dps_mixing"):  # eval, or functional_call's call below
        return own_forward(module, *args, **kwargs)
    tensors = {name: effective_tensor(optimizer, tensor) for name, tensor in _mixed_tensors(module).items()}
    if isinstance(module, nn.Linear):
        return F.linear(args[0] if args else kwargs["input"], tensors["weight"], tensors.get("bias"))
    module._dps_mixing = True  # functional_call calls module(...), i.e. this function again
    try:  # the module's own forward, with the mixed tensors in place of its parameters
        return torch.func.functional_call(module, tensors, args, kwargs, tie_weights=False, strict=False)
    finally:
        module._dps_mixing = False


class MixHandle:
    """Returned by attach(); remove() restores the modules' own forward."""

    def __init__(self, modules):
        self.modules = modules

    def remove(self):
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.modules = []


def attach(optimizer, model):
    """Mix every nn.Linear and nn.MultiheadAttention of `model` that holds a tensor
    of a variant="mix" group of `optimizer`; W0 is captured now. A tensor of such a
    group that no such module holds (e.g. GPT-2's Conv1D, which stores its weight
    transposed, or a custom layer) is a ValueError: it could not be mixed."""
    mixed_params = {id(p): p for g in optimizer.param_groups if is_mixed(g) for p in g["params"]}
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    modules, covered = [], set()
    for module in model.modules():
        tensors = _mixed_tensors(module)
        if tensors is None or id(module) in inside_attention:
            continue
        chosen = [t for t in tensors.values() if id(t) in mixed_params]
        if not chosen:
            continue
        if "forward" in module.__dict__:
            raise RuntimeError(f"{module} already has its forward replaced (attached twice?)")
        modules.append(module)
        covered.update(map(id, chosen))
    names = {id(p): n for n, p in model.named_parameters()}
    left = [names.get(i, f"a tensor of shape {tuple(p.shape)}") for i, p in mixed_params.items()
            if i not in covered and i in names]
    if left:
        raise ValueError(f"variant='mix' can mix only the weights and biases of nn.Linear and nn.MultiheadAttention "
                         f"(it replaces their forward); these tensors of a mix group are in other modules: "
                         f"{', '.join(left[:10])}. Put them in a group with variant='dense'.")
    if not modules:
        raise ValueError("model has no nn.Linear or nn.MultiheadAttention whose tensors are in a variant='mix' "
                         "group of this optimizer")
    for module in modules:
        for tensor in _mixed_tensors(module).values():
            if id(tensor) in mixed_params:
                optimizer.state[tensor].setdefault("mix_init", tensor.detach().clone())
        module.forward = functools.partial(_mixed_forward, optimizer, module)
    return MixHandle(modules)


def check_mixed(optimizer, params):
    """Raise unless every param of a mix group went through a mixed backward."""
    for param in params:
        if "mix_calls" not in optimizer.state.get(param, {}):
            raise RuntimeError(
                f"a parameter of shape {tuple(param.shape)} is in a variant='mix' group but its gradient did "
                "not come through DPS-Mix mixing: call opt.attach_mix(model) before training, and manage "
                "only the weights and biases of nn.Linear and nn.MultiheadAttention with variant='mix'")


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
