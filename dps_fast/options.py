"""DPSAdamW's arguments: what each may be, checked before anything changes.

Every check raises ValueError (or TypeError) naming the argument, the group it
belongs to and the allowed values. DPSAdamW runs check_group on the defaults,
on every group it is given, on loaded groups, and on every group at each step
(a value set by hand in param_groups is checked too).
"""
import numbers

import torch

from . import state_format as formats
from .schedule import stage_steps_from

VARIANTS = ("dense", "mix")
MASKED = ("grad", "freeze")
TORCH_NAMES = {"lr": "learning rate", "eps": "epsilon value", "weight_decay": "weight_decay value"}


def _real(value, name, where):
    """`value` as a float: a real number or a 1-element tensor (as torch accepts lr)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:  # torch.optim's words first
            raise ValueError(f"{where}Tensor {name} must be 1-element; got shape {tuple(value.shape)}")
        if value.is_complex():
            raise ValueError(f"{where}{name} must be a real number; got a {value.dtype} tensor")
        return float(value)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{where}{name} must be a real number; got {value!r}")
    return float(value)


def check_group(group, backend, where=""):
    """Raise ValueError/TypeError naming the first invalid setting of `group` (a param
    group with the defaults filled in); `where` prefixes the message (e.g. "param group 1: ")."""
    for name in ("lr", "eps", "weight_decay"):  # torch.optim's words first, here and below
        if not _real(group[name], name, where) >= 0:
            raise ValueError(f"{where}Invalid {TORCH_NAMES[name]}: {group[name]}: {name} must be a real number "
                             ">= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}betas must be a pair of numbers in [0, 1); got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0 <= _real(beta, f"betas[{i}]", where) < 1:
            raise ValueError(f"{where}Invalid beta parameter at index {i}: {beta}: betas must be a pair of numbers "
                             f"in [0, 1); got {betas!r}")
    for name in ("maximize", "amsgrad", "capturable", "differentiable", "dps"):
        if not isinstance(group[name], bool):
            raise TypeError(f"{where}{name} must be True or False; got {group[name]!r}")
    for name in ("foreach", "fused"):
        if group[name] not in (None, True, False):
            raise TypeError(f"{where}{name} must be None, True or False; got {group[name]!r}")
    for name, why in UNSUPPORTED.items():
        if group[name]:
            raise ValueError(f"{where}{name}=True is not supported by DPSAdamW: {why}")
    if group["fused"] and group["foreach"]:  # a RuntimeError, as in torch.optim
        raise RuntimeError(f"{where}`fused` and `foreach` cannot be `True` together.")
    kind = implementation(group)
    if kind == "fused" and backend == "torch":
        raise ValueError(f"{where}fused=True / foreach=True ask for a multi-tensor kernel, and backend='torch' is "
                         "the per-tensor pure-PyTorch loop: use backend='auto' (or 'cpu', 'cuda', 'triton')")
    if kind == "unfused" and backend not in ("auto", "torch"):
        raise ValueError(f"{where}fused=False / foreach=False ask for the per-tensor loop, which is "
                         f"backend='torch', not backend={backend!r}")
    if group["state_dtype"] not in formats.NAMES:
        raise ValueError(f"{where}state_dtype must be one of {formats.NAMES}; got {group['state_dtype']!r}")
    refusal = formats.kernel_refusal(group["state_dtype"])
    if refusal is not None and backend not in ("auto", "torch"):
        raise ValueError(f"{where}backend={backend!r} cannot store this group's state: {refusal}; use "
                         "backend='torch', or 'auto', which picks it for such groups")
    if refusal is not None and kind == "fused":
        raise ValueError(f"{where}fused=True / foreach=True ask for a multi-tensor kernel, and {refusal}; leave "
                         "fused and foreach None (or False)")
    if group["rounding"] not in formats.ROUNDINGS:
        raise ValueError(f"{where}rounding must be one of {formats.ROUNDINGS}; got {group['rounding']!r}")
    seed = group["seed"]
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"{where}seed must be an integer in [0, 2**32); got {seed!r}")
    if not group["dps"]:
        return
    sparsity = group["sparsity"]
    if not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise ValueError(f"{where}sparsity must be a number in [0, 1); got {sparsity!r}")
    stage_steps = group["stage_steps"]
    if stage_steps is None:
        raise ValueError(f"{where}stage length missing: give stage_steps (an integer >= 1) or total_steps "
                         "(T = int(total_steps * stage_ratio)), to the optimizer or to this group")
    if not isinstance(stage_steps, numbers.Integral) or isinstance(stage_steps, bool) or stage_steps < 1:
        raise ValueError(f"{where}stage_steps must be an integer >= 1; got {stage_steps!r}")
    if group["variant"] not in VARIANTS:
        raise ValueError(f"{where}variant must be one of {VARIANTS}; got {group['variant']!r}")
    if group["masked"] not in MASKED:
        raise ValueError(f"{where}masked must be one of {MASKED}; got {group['masked']!r}")


# torch.optim.AdamW options DPSAdamW does not implement, and why (each must be False).
UNSUPPORTED = {
    "amsgrad": "DPS's published update is AdamW without AMSGrad; use torch.optim.AdamW(amsgrad=True)",
    "capturable": "the kernels' tables are staged from host memory at each step, so a step cannot be "
                  "captured in a CUDA graph; use capturable=False",
    "differentiable": "the step updates in place under torch.no_grad(); use torch.optim.AdamW(differentiable=True)",
}


def implementation(group):
    """"fused" (a multi-tensor kernel), "unfused" (the per-tensor loop) or None (any),
    from torch's fused / foreach flags of `group`."""
    if group["fused"] or group["foreach"]:
        return "fused"
    if group["fused"] is False or group["foreach"] is False:
        return "unfused"
    return None


def check_params(params):
    for param in params:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"params must be tensors or (name, tensor) pairs; got {type(param).__name__}")
        if param.is_complex():
            raise TypeError(f"params must be real floating-point tensors; got a {param.dtype} tensor")
        if not param.is_floating_point():
            raise TypeError(f"params must be floating-point tensors; got a {param.dtype} tensor")


def stage_steps(stage_steps, total_steps, stage_ratio, where=""):
    """T from stage_steps, or from total_steps * stage_ratio as published; None if neither is given."""
    if stage_steps is not None:
        if total_steps is not None:
            raise ValueError(f"{where}give either stage_steps or total_steps (with stage_ratio), not both")
        return stage_steps
    if total_steps is None:
        return None
    if not isinstance(total_steps, numbers.Integral) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"{where}total_steps must be an integer >= 1; got {total_steps!r}")
    if not isinstance(stage_ratio, numbers.Real) or not 0 < stage_ratio <= 1:
        raise ValueError(f"{where}stage_ratio must be a number in (0, 1]; got {stage_ratio!r}")
    length = stage_steps_from(total_steps, stage_ratio)
    if length < 1:
        raise ValueError(f"{where}stage_steps = int(total_steps * stage_ratio) = int({total_steps} * {stage_ratio}) "
                         "= 0; give more total_steps, a larger stage_ratio, or stage_steps directly")
    return length


def normalized_group(param_group, default_stage_ratio, default_total_steps=None, where=""):
    """A copy of `param_group` whose "params" is a list of checked tensors (names of
    (name, tensor) pairs go to "param_names", as torch does) and whose stage length,
    if the group gives one (stage_steps, total_steps, or a stage_ratio of the
    optimizer's total_steps), is stage_steps."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict; got {type(param_group).__name__}")
    group = dict(param_group)
    params = group["params"]
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                        "of tensors in sets will change between runs. Please use a list instead.")
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    named = [isinstance(p, tuple) for p in params]
    if any(named):
        if not all(named) or any(len(p) != 2 for p in params):  # torch.optim's words first
            raise ValueError("all optimizer params should be with/without names. Some param names are missing: "
                             "params must be all tensors or all (name, tensor) pairs")
        group["param_names"] = [name for name, _ in params]
        params = [tensor for _, tensor in params]
    check_params(params)
    group["params"] = params
    if "stage_steps" in group or "total_steps" in group:
        group["stage_steps"] = stage_steps(group.get("stage_steps"), group.pop("total_steps", None),
                                           group.get("stage_ratio", default_stage_ratio), where)
    elif "stage_ratio" in group and group.get("dps", True):  # a plain group needs no stage length
        if default_total_steps is None:
            raise ValueError(f"{where}stage_ratio={group['stage_ratio']!r} sets T = int(total_steps * stage_ratio), "
                             "and no total_steps was given: give total_steps (to this group or to the "
                             "optimizer) or stage_steps")
        group["stage_steps"] = stage_steps(None, default_total_steps, group["stage_ratio"], where)
    return group
