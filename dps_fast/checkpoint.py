"""DPSAdamW's state dicts: what state_dict() leaves out and how load_state_dict()
checks, converts and migrates what it is given (DPSAdamW's methods call these).

A load builds the whole new state before anything changes, so a failed load
leaves the optimizer as it was. Each entry's moments and scores are brought
to the current group's state format (param_state.in_format: fp32, bf16 and
8-bit state load into one another, converted deterministically: rounded to
nearest, quantized or dequantized block-wise; bf16 moments into bf16 state
without an fp32 copy, 8-bit codes into 8-bit state as they are) whatever the
parameter's dtype; then each of its tensors goes through param_state.adopt
(fits its parameter, or is brought to the form the kernels take: its dtype,
device and layout, a bool mask packed; or is a ValueError naming the
parameter and the key) and the entry through param_state.check_complete.
The groups keep their own state_dtype and rounding (STORAGE_KEYS); every
other setting comes from the state dict, as torch does. A torch.optim.AdamW
group (one without "dps_step") migrates: its hyperparameters, moments and
steps are taken (into 8-bit state: quantized), the current group's DPS
settings kept (DPS_KEYS), and the DPS schedule starts with an exploration
stage at the next step.
"""
import copy
from collections import defaultdict

import torch

from . import distributed, options, param_state
from . import state_format as formats

# Group keys that migrating a torch.optim.AdamW state dict keeps from the current groups: those
# AdamW lacks; foreach and fused, which in DPSAdamW choose the backend (options.implementation);
# capturable and differentiable, which DPSAdamW supports only as False (AdamW's state loads either way).
DPS_KEYS = ("dps", "sparsity", "stage_steps", "stage_ratio", "variant", "masked", "state_dtype", "rounding", "seed",
            "foreach", "fused", "capturable", "differentiable")
# Group keys that every load keeps from the current groups: how this run stores its state and
# parameters (the state is converted to the current format: a state dict of either loads into either).
STORAGE_KEYS = ("state_dtype", "rounding")


def saved(optimizer, state_dict):
    """`state_dict` (from Optimizer.state_dict) less the per-shard masks of DTensor
    parameters (selected again after loading: dps_fast.distributed)."""
    seen = set()
    for index, param in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        if id(param) not in seen and distributed.is_dtensor(param) and index in state_dict["state"]:
            state_dict["state"][index] = distributed.state_to_save(param, state_dict["state"][index])
        seen.add(id(param))
    return state_dict


def loaded(optimizer, state_dict):
    """(state, param_groups) that `optimizer` takes from `state_dict`, checked and
    converted; raises ValueError, changing nothing, where an entry cannot fit."""
    saved_groups = copy.deepcopy(state_dict["param_groups"])
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(optimizer.param_groups, saved_groups)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                         "optimizer's group")
    groups = [_group(optimizer, i, group, saved_group)
              for i, (group, saved_group) in enumerate(zip(optimizer.param_groups, saved_groups))]
    owner = {}  # saved id -> (param, its new group, the saved group, its name)
    for i, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        for j, (saved_id, param) in enumerate(zip(saved_group["params"], group["params"])):
            owner[saved_id] = (param, group, saved_group, f"param_groups[{i}]['params'][{j}]")
    state = defaultdict(dict)
    for key, entry in state_dict["state"].items():
        if key not in owner:
            state[key] = entry  # state not assigned to a parameter is kept as it is, as torch does
            continue
        param, group, saved_group, where = owner[key]
        format = group["state_dtype"]
        entry = param_state.in_format(param, entry, format)  # (before a DTensor's full tensors are cut)
        if distributed.is_dtensor(param):  # its shards may be views of the state dict's tensors: copies
            entry = distributed.loaded_state(param, {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                     for k, v in entry.items()})
        entry = {name: param_state.adopt(param, name, value, where, format) for name, value in entry.items()}
        param_state.check_complete(entry, _is_mixed(group), where, formats.of(format).for_param(param).quantized)
        if "schedule_start" not in saved_group:  # tags of an older dps_fast: stage numbers, now first steps
            stage_steps = saved_group.get("stage_steps") or 1
            entry.update({tag: (entry[tag] - 1) * stage_steps + 1 for tag in param_state.TAGS if tag in entry})
        state[param] = entry
    for group in filter(_is_mixed, groups):  # W0 as attach_mix took it, where the state dict has none
        for param in group["params"]:       # (an AdamW state dict, or a param that never stepped)
            if "mix_init" in optimizer.state.get(param, {}) and "mix_init" not in state.get(param, {}):
                state[param]["mix_init"] = optimizer.state[param]["mix_init"]
    return state, groups


def _is_mixed(group):
    return group["dps"] and group["variant"] == "mix"


def _group(optimizer, index, group, saved_group):
    """The param group `group` becomes when loading `saved_group` (hyperparameters from
    it, as torch does), checked; a torch.optim.AdamW group migrates."""
    where = f"loaded param group {index}: "
    new = {**saved_group, "params": group["params"]}
    if "param_names" in group and "param_names" not in saved_group:
        new["param_names"] = group["param_names"]
    if "dps_step" not in saved_group:  # torch.optim.AdamW's (or another dps-less) group
        if "lr" not in saved_group or "betas" not in saved_group:
            raise ValueError(f"{where}neither DPSAdamW's nor torch.optim.AdamW's (no lr or betas)")
        if not saved_group.get("decoupled_weight_decay", True) and saved_group.get("weight_decay", 0):
            raise ValueError(f"{where}a torch.optim.Adam group with L2 weight_decay; DPSAdamW decouples "
                             "weight decay as AdamW does: migrate from torch.optim.AdamW, or set weight_decay=0")
        new.pop("decoupled_weight_decay", None)
        new.update({key: group[key] for key in DPS_KEYS})
        new.update(dps_step=0, schedule_start=0, schedule_stage_steps=group["stage_steps"])
    new.update({key: group[key] for key in STORAGE_KEYS})
    for key, value in optimizer.defaults.items():
        new.setdefault(key, value)
    new.setdefault("schedule_start", 0)
    new.setdefault("schedule_stage_steps", new["stage_steps"])
    options.check_group(new, optimizer.backend, where)
    return new
