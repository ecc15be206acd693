"""DPSAdamW: AdamW that fine-tunes adaptively selected subnetworks (DPS).

Validation, state, schedule and dispatch live here; the arithmetic of an
update lives in the backends (dps_fast/backends), the per-parameter state's
rules in dps_fast/param_state.py, the forward-side mixing of DPS-Mix in
dps_fast/mix.py.
"""
import copy
import itertools
import numbers
import warnings
from collections import defaultdict

import torch
from torch.optim import Optimizer

from . import amp, backends, distributed, mix, param_state, selection
from .schedule import EXPLORE, phase_of, stage_start, stage_steps_from

VARIANTS = ("dense", "mix")
MASKED = ("grad", "freeze")
# The per-parameter state a step writes on the host (undone if GradScaler skips it).
STEP_STATE = ("step", "exp_avg", "exp_avg_sq", "score", "score_stage", "mix_count")
# Group keys of DPS's schedule: the step count, and where (and with which T) the
# schedule in force began: a change of stage_steps starts a new schedule.
SCHEDULE_KEYS = ("dps_step", "schedule_start", "schedule_stage_steps")
# Group keys a torch.optim.AdamW state dict lacks; migrating one keeps them from the current groups.
DPS_KEYS = ("dps", "sparsity", "stage_steps", "variant", "masked")


def _real(value, name, where):
    """`value` as a float: a real number or a 1-element tensor (as torch accepts lr)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{where}{name} as a tensor must have 1 element; got shape {tuple(value.shape)}")
        return float(value)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{where}{name} must be a real number; got {value!r}")
    return float(value)


def _check_group(group, backend, where=""):
    """Raise ValueError/TypeError naming the first invalid setting of `group` (a param
    group with the defaults filled in); `where` prefixes the message (e.g. "param group 1: ")."""
    for name in ("lr", "eps", "weight_decay"):
        if not _real(group[name], name, where) >= 0:
            raise ValueError(f"{where}{name} must be a real number >= 0; got {group[name]!r}")
    betas = group["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(0 <= _real(b, "betas", where) < 1 for b in betas)):
        raise ValueError(f"{where}betas must be a pair of numbers in [0, 1); got {betas!r}")
    for name in ("maximize", "amsgrad", "capturable", "differentiable", "dps"):
        if not isinstance(group[name], bool):
            raise TypeError(f"{where}{name} must be True or False; got {group[name]!r}")
    for name in ("foreach", "fused"):
        if group[name] not in (None, True, False):
            raise TypeError(f"{where}{name} must be None, True or False; got {group[name]!r}")
    for name, why in UNSUPPORTED.items():
        if group[name]:
            raise ValueError(f"{where}{name}=True is not supported by DPSAdamW: {why}")
    if group["fused"] and group["foreach"]:
        raise ValueError(f"{where}`fused` and `foreach` cannot be `True` together.")
    implementation = _implementation(group)
    if implementation == "fused" and backend == "torch":
        raise ValueError(f"{where}fused=True / foreach=True ask for a multi-tensor kernel, and backend='torch' is "
                         "the per-tensor pure-PyTorch loop: use backend='auto' (or 'cpu', 'cuda', 'triton')")
    if implementation == "unfused" and backend not in ("auto", "torch"):
        raise ValueError(f"{where}fused=False / foreach=False ask for the per-tensor loop, which is "
                         f"backend='torch', not backend={backend!r}")
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


def _implementation(group):
    """"fused" (a multi-tensor kernel), "unfused" (the per-tensor loop) or None (any),
    from torch's fused / foreach flags of `group`."""
    if group["fused"] or group["foreach"]:
        return "fused"
    if group["fused"] is False or group["foreach"] is False:
        return "unfused"
    return None


def _check_params(params):
    for param in params:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"params must be tensors or (name, tensor) pairs; got {type(param).__name__}")
        if param.is_complex():
            raise TypeError(f"params must be real floating-point tensors; got a {param.dtype} tensor")
        if not param.is_floating_point():
            raise TypeError(f"params must be floating-point tensors; got a {param.dtype} tensor")


def _stage_steps(stage_steps, total_steps, stage_ratio, where=""):
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
    stage_steps = stage_steps_from(total_steps, stage_ratio)
    if stage_steps < 1:
        raise ValueError(f"{where}stage_steps = int(total_steps * stage_ratio) = int({total_steps} * {stage_ratio}) "
                         "= 0; give more total_steps, a larger stage_ratio, or stage_steps directly")
    return stage_steps


class DPSAdamW(Optimizer):
    """AdamW with Dynamic Parameter Selection (Zhang et al., NeurIPS 2022).

    Training alternates stages of `stage_steps` optimizer steps. In exploration
    stages (odd) every tensor is updated and managed tensors accumulate a score
    (squared gradients); at the start of each exploitation stage (even) each
    managed tensor keeps its ceil(N * (1 - sparsity)) top-scored entries (ties
    kept) and only those are updated until the stage ends.

    Args:
        params: tensors, (name, tensor) pairs, or param groups. A group may
            override any argument below except backend (stage_steps, or
            total_steps and stage_ratio, included); a group with "dps": False
            is plain AdamW and needs no stage length.
        lr, betas, eps, weight_decay, maximize: as in torch.optim.AdamW (lr
            and betas may be 1-element tensors).
        amsgrad, capturable, differentiable: accepted for torch.optim.AdamW's
            signature; only False is supported (True raises ValueError).
        foreach, fused: None (default: backend decides), True (a multi-tensor
            kernel: not backend "torch"), False (the per-tensor loop: backend "torch").
        sparsity: fraction of each managed tensor frozen in exploitation stages.
        stage_steps: stage length T; or give total_steps and stage_ratio
            (T = int(total_steps * stage_ratio)). Changing a group's stage_steps
            mid-run starts a new schedule (an exploration stage) at its next step.
        variant: "dense" (DPS-Dense) or "mix" (DPS-Mix; call attach_mix(model)).
        masked: "grad" (published: masked entries get a zero gradient, their
            moments and weight decay go on) or "freeze" (masked entries keep
            their value, moments, and get no weight decay).
        backend: "auto" or one of dps_fast.backends.BACKEND_NAMES.

    Math and state are fp32 whatever the parameter dtype (float64 for float64
    parameters); a bf16/fp16 parameter is rounded to its own dtype after each update.

    Under a GradScaler, step() takes the loss scale and found_inf on the
    device and never waits for them (dps_fast.amp): until the next step(),
    group["dps_step"] and per-tensor steps count the last step provisionally.
    """

    _step_supports_amp_scaling = True  # GradScaler: pass grad_scale/found_inf, skip in the kernels

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 sparsity=0.3, stage_steps=None, total_steps=None, stage_ratio=0.05, variant="dense",
                 masked="grad", backend="auto", maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None):
        backends.check_name(backend)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused, sparsity=sparsity,
                        stage_steps=_stage_steps(stage_steps, total_steps, stage_ratio), stage_ratio=stage_ratio,
                        variant=variant, masked=masked, dps=True)
        # checked as a plain group (a group may give its own stage length), then as a managed one
        _check_group({**defaults, "dps": False}, backend)
        if defaults["stage_steps"] is not None:
            _check_group(defaults, backend)
        self.backend = backend
        self._reset_transient()
        super().__init__(params, defaults)

    def _reset_transient(self):
        """Caches and per-step bookkeeping: not part of the optimizer's state (nor of its pickle)."""
        self._backend_by_device = {}
        self._minus_ones = {}
        self._pending_clip = None
        self._group_index = None
        self._unconfirmed = None  # the last step's amp.ScaledStep until its found_inf is read

    def __getstate__(self):
        self._confirm_last_step()
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self._reset_transient()

    # ----- param groups and state -------------------------------------------------

    def add_param_group(self, param_group):
        """Add a group; it joins the optimizer's step count (and so its stage)."""
        self._confirm_last_step()
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict; got {type(param_group).__name__}")
        param_group = dict(param_group)
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                            "of tensors in sets will change between runs. Please use a list instead.")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        named = [isinstance(p, tuple) for p in params]
        if any(named):
            if not all(named) or any(len(p) != 2 for p in params):
                raise ValueError("params must be all tensors or all (name, tensor) pairs")
            param_group["param_names"] = [name for name, _ in params]
            params = [tensor for _, tensor in params]
        _check_params(params)
        where = f"param group {len(self.param_groups)}: "
        if "stage_steps" in param_group or "total_steps" in param_group:
            param_group["stage_steps"] = _stage_steps(
                param_group.get("stage_steps"), param_group.pop("total_steps", None),
                param_group.get("stage_ratio", self.defaults["stage_ratio"]), where)
        group = {**self.defaults, **param_group, "params": params}
        _check_group(group, self.backend, where)
        for param in params:  # fail now, not at the first step, if the backend cannot run there
            self._backend_for(param.device, group)
        distributed.check_group(group)
        first = self.param_groups[0] if self.param_groups else {}
        param_group["dps_step"] = param_group.get("dps_step", first.get("dps_step", 0))
        param_group.setdefault("schedule_start", first.get("schedule_start", 0))
        param_group.setdefault("schedule_stage_steps", group["stage_steps"])
        param_group["params"] = params
        super().add_param_group(param_group)
        self._group_index = None

    def state_dict(self):
        """As torch.optim.Optimizer.state_dict, less the per-shard masks of DTensor
        parameters (selected again after loading: dps_fast.distributed)."""
        self._confirm_last_step()
        state_dict = super().state_dict()
        seen = set()
        for index, param in enumerate(p for g in self.param_groups for p in g["params"]):
            if id(param) not in seen and distributed.is_dtensor(param) and index in state_dict["state"]:
                state_dict["state"][index] = distributed.state_to_save(param, state_dict["state"][index])
            seen.add(id(param))
        return state_dict

    def load_state_dict(self, state_dict):
        """As torch.optim.Optimizer.load_state_dict (hooks included), with three differences.

        - Every state entry is checked against its parameter before anything
          changes (a failed load leaves the optimizer as it was) and brought to
          the form the kernels take (dps_fast.param_state.adopt): moments and scores
          stay (or become) fp32 whatever the parameter's dtype, in its layout; a
          bool mask is packed. An entry that cannot fit (another shape) is a
          ValueError naming the parameter and the key.
        - A torch.optim.AdamW state dict migrates: AdamW's hyperparameters,
          moments and steps are taken, the DPS settings of the current groups are
          kept, and the DPS schedule starts (with an exploration stage) at the next step.
        - DTensor parameters take full (unsharded) state tensors too.
        """
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        groups = [self._loaded_group(i, group, saved) for i, (group, saved) in
                  enumerate(zip(self.param_groups, saved_groups))]
        group_of = {}  # saved id -> (param, its group, its name)
        for i, (group, saved) in enumerate(zip(groups, saved_groups)):
            for j, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                group_of[saved_id] = (param, group, saved, f"param_groups[{i}]['params'][{j}]")
        loaded = defaultdict(dict)
        for key, entry in state_dict["state"].items():
            if key not in group_of:
                loaded[key] = entry  # state not assigned to a parameter is kept as it is, as torch does
                continue
            param, group, saved, where = group_of[key]
            if distributed.is_dtensor(param):  # its shards may be views of the state dict's tensors: copies
                entry = distributed.loaded_state(param, {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                         for k, v in entry.items()})
            entry = {name: param_state.adopt(param, name, value, where) for name, value in entry.items()}
            if "schedule_start" not in saved:  # tags of an older dps_fast: stage numbers, now first steps
                T = saved.get("stage_steps") or 1
                entry.update({tag: (entry[tag] - 1) * T + 1 for tag in param_state.TAGS if tag in entry})
            loaded[param] = entry
        self.__setstate__({"state": loaded, "param_groups": groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _loaded_group(self, index, group, saved):
        """The param group `group` becomes when loading `saved` (hyperparameters from
        `saved`, as torch does), checked; a torch.optim.AdamW group migrates."""
        where = f"loaded param group {index}: "
        new = {**saved, "params": group["params"]}
        if "param_names" in group and "param_names" not in saved:
            new["param_names"] = group["param_names"]
        if "dps_step" not in saved:  # torch.optim.AdamW's (or another dps-less) group
            if "lr" not in saved or "betas" not in saved:
                raise ValueError(f"{where}neither DPSAdamW's nor torch.optim.AdamW's (no lr or betas)")
            if not saved.get("decoupled_weight_decay", True) and saved.get("weight_decay", 0):
                raise ValueError(f"{where}a torch.optim.Adam group with L2 weight_decay; DPSAdamW decouples "
                                 "weight decay as AdamW does: migrate from torch.optim.AdamW, or set weight_decay=0")
            new.pop("decoupled_weight_decay", None)
            new.update({key: group[key] for key in DPS_KEYS + ("stage_ratio",)})
            new.update(dps_step=0, schedule_start=0, schedule_stage_steps=group["stage_steps"])
        for key, value in self.defaults.items():
            new.setdefault(key, value)
        new.setdefault("schedule_start", 0)
        new.setdefault("schedule_stage_steps", new["stage_steps"])
        _check_group(new, self.backend, where)
        return new

    def _group_of(self, param, required=True):
        """The param group holding `param` (None or ValueError if none does)."""
        groups = self.param_groups
        found = None if self._group_index is None else self._group_index.get(id(param))
        if found is None or found[0] >= len(groups) or found[1] >= len(groups[found[0]]["params"]) \
                or groups[found[0]]["params"][found[1]] is not param:
            # params were added, swapped in place (accelerate's FSDP2 prepare) or removed: index again
            self._group_index = {id(p): (i, j) for i, g in enumerate(groups) for j, p in enumerate(g["params"])}
            found = self._group_index.get(id(param))
        if found is None:
            if required:
                raise ValueError("param is not a parameter of this optimizer")
            return None
        return groups[found[0]]

    def _minus_one(self, device):
        """A 0-dim -1 on `device`: the gradient factor of maximize=True."""
        if device not in self._minus_ones:
            self._minus_ones[device] = torch.full((), -1.0, device=device)
        return self._minus_ones[device]

    def _backend_for(self, device, group=None):
        """The backend module for `group`'s tensors on `device` (its fused/foreach flags)."""
        device = torch.device(device)
        key = device, None if group is None else _implementation(group)
        if key not in self._backend_by_device:
            self._backend_by_device[key] = backends.resolve(self.backend, device, key[1])
        return self._backend_by_device[key]

    # ----- public queries ---------------------------------------------------------

    @property
    def phase(self):
        """"explore" or "exploit": the phase of the next step() (of the first
        managed group; groups may set their own stage_steps)."""
        for group in self.param_groups:
            if group["dps"]:
                return self._upcoming(group, with_stage=False)[0]
        return EXPLORE

    def mask(self, param):
        """The bool mask (param's shape) of the latest exploitation stage, or None
        before the first one (and for tensors not managed by DPS)."""
        self._group_of(param)
        bits = self.state.get(param, {}).get("mask")
        return None if bits is None else _unpack(param, bits)

    def attach_mix(self, model):
        """Route the forward pass of `model` through DPS-Mix mixing (see
        dps_fast.mix.attach). Returns a handle with .remove()."""
        return mix.attach(self, model)

    # ----- schedule ---------------------------------------------------------------

    def _schedule(self, group):
        """(start, T) of the group's schedule; a changed stage_steps starts a new
        schedule after the steps taken so far."""
        if group["schedule_stage_steps"] != group["stage_steps"]:
            group["schedule_start"], group["schedule_stage_steps"] = group["dps_step"], group["stage_steps"]
        return group["schedule_start"], group["stage_steps"]

    def _upcoming(self, group, with_stage=True):
        """(phase, stage) of the group's next step (stage None if not with_stage).
        A stage is named by its first step (dps_fast.schedule.stage_start).

        While the last step is unconfirmed (GradScaler, dps_fast.amp), its
        found_inf is read only if the answer would differ had it been skipped:
        near stage boundaries, not within a stage."""
        def schedule(step):
            start, stage_steps = self._schedule(group)
            return self._phase(group, step), stage_start(step, stage_steps, start) if with_stage else None

        step = group["dps_step"] + 1
        last = self._unconfirmed
        if last is not None and last.advanced(group) and schedule(step) != schedule(step - 1):
            self._confirm_last_step()
            step = group["dps_step"] + 1
        return schedule(step)

    def _confirm_last_step(self):
        """Read the last step's found_inf; if it was skipped, undo its host-side changes."""
        last, self._unconfirmed = getattr(self, "_unconfirmed", None), None
        if last is not None and last.skipped():
            last.undo()

    def _phase(self, group, step):
        """The phase of optimizer step `step` of managed `group`: DPS alternates
        stages. The one place a subclass changes the schedule (every step
        exploits in ChildTuning, explores in Mixout: dps_fast.baselines)."""
        start, stage_steps = self._schedule(group)
        return phase_of(step, stage_steps, start)

    def _ensure_masks(self, group, params, stage):
        """Give each managed param (with a score) the mask of exploitation stage
        `stage`, selecting it from the scores the first time it is asked for.
        Only a score of the exploration stage just before `stage` counts."""
        start, stage_steps = self._schedule(group)
        scored_in = stage_start(stage - 1, stage_steps, start) if stage - 1 > start else None
        todo = [p for p in params
                if self.state[p].get("mask_stage") != stage and self.state[p].get("score_stage") == scored_in]
        whole = [p for p in todo if not distributed.is_dtensor(p)]
        sharded = [p for p in todo if distributed.is_dtensor(p)]
        selections = [(on_device, self._backend_for(device, group).select_masks)
                      for device, on_device in _by_device(whole).items()]
        if sharded:  # thresholds over whole tensors: a collective over their shards
            selections.append((sharded, distributed.select_masks))
        for chosen, select in selections:
            scores = [self._selection_score(p, group) for p in chosen]
            for param, bits in zip(chosen, select(scores, group["sparsity"])):
                self.state[param]["mask"] = bits
                self.state[param]["mask_stage"] = stage

    def _selection_score(self, param, group):
        state = self.state[param]
        if group["variant"] == "mix":
            return selection.mix_normalised_score(state["score"], state["mix_count"], group["stage_steps"])
        return state["score"]

    def _upcoming_masks(self, group, params):
        """Masks the next step applies (None for each param if it explores, or for a
        param with no mask of this stage: no score from the stage before)."""
        if not group["dps"]:
            return [None] * len(params)
        phase, stage = self._upcoming(group)
        if phase == EXPLORE:
            return [None] * len(params)
        self._ensure_masks(group, params, stage)
        return [self._current_mask(p, stage) for p in params]

    def _current_mask(self, param, stage):
        """param's packed mask of exploitation stage `stage`, or None if it has none."""
        state = self.state[param]
        return state["mask"] if state.get("mask_stage") == stage else None

    # ----- gradient clipping ------------------------------------------------------

    @torch.compiler.disable  # as step(): it reads the schedule, which changes every step
    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False):
        """Clip the gradients the next step() applies (masked in exploitation
        stages) to total norm `max_norm`, as published code does after masking
        in autograd. Returns the total norm before clipping.

        The clip factor is applied inside the next step(); p.grad is left as is
        so that exploration scores see the unclipped gradient, as in the
        published code. Changing a gradient after this call cancels the clip."""
        max_norm = float(max_norm)
        grads, masked, watched = [], {}, []  # masked: {device: [(grad, bits)]}, their norms from the backend
        l2 = float(norm_type) == 2.0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for param, bits in zip(params, self._upcoming_masks(group, params)):
                if bits is None:
                    grads.append(param.grad)
                elif l2 and not distributed.is_dtensor(param):
                    masked.setdefault(self._backend_for(param.device, group), []).append((param.grad, bits))
                else:
                    grads.append(param.grad * _unpack(param, bits))
                watched.append((param.grad, param.grad._version))
        for backend, pairs in masked.items():  # the 2-norm of the per-tensor 2-norms is the total 2-norm
            for on_device in _by_device(pairs, lambda pair: pair[0].device).values():
                grads.append(backend.masked_norms(*zip(*on_device)))
        total_norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
        if distributed.is_dtensor(total_norm):  # sharded gradients: the norm over all shards
            total_norm = total_norm.full_tensor()
        clip_coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
        self._pending_clip = (clip_coef, watched)
        return total_norm

    def _take_pending_clip(self):
        """The clip factor set by clip_grad_norm_, if the gradients are unchanged since."""
        pending, self._pending_clip = self._pending_clip, None
        if pending is None:
            return None
        clip_coef, watched = pending
        current = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        unchanged = len(current) == len(watched) and all(
            grad is seen and grad._version == version for grad, (seen, version) in zip(current, watched))
        if not unchanged:
            warnings.warn("gradients changed after clip_grad_norm_; that clip is not applied. "
                          "Call clip_grad_norm_ right before step().", stacklevel=3)
            return None
        return clip_coef

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        self._pending_clip = None
        mix.reset_keep(self)

    # ----- the step ---------------------------------------------------------------

    @torch.compiler.disable  # see README, "torch.compile": the step is fused kernels plus host bookkeeping
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step. Everything is validated before anything changes.

        A GradScaler's `scaler.step(opt)` calls this with opt.grad_scale and
        opt.found_inf set (see dps_fast.amp); a step it skips changes nothing."""
        self._confirm_last_step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for index, group in enumerate(self.param_groups):
            _check_group(group, self.backend, f"param group {index}: ")
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:
                if param.grad.is_sparse:
                    raise RuntimeError("DPSAdamW does not support sparse gradients")
            self._check_state(index, group, params)
            if group["dps"] and group["variant"] == "mix":
                mix.check_mixed(self, params)
            work.append((group, params))
        clip_coef = self._take_pending_clip()
        scaled = amp.ScaledStep.of(self)
        for group, params in work:
            self._step_group(group, params, clip_coef, scaled)
        mix.reset_keep(self)
        if scaled is not None:
            scaled.queued()
            self._unconfirmed = scaled
        return loss

    def _check_state(self, index, group, params):
        """ValueError naming the parameter if a state entry of `params` no longer fits
        it (a parameter reshaped or moved through .data, or state set by hand)."""
        have = [p for p in params if "exp_avg" in self.state.get(p, ())]
        if not have:
            return
        states = [self.state[p] for p in have]
        local = distributed.local if any(map(distributed.is_dtensor, have)) else _same

        def where(chosen):
            def name(i):
                position = next(j for j, p in enumerate(group["params"]) if p is chosen[i])
                return f"param_groups[{index}]['params'][{position}]"
            return name

        param_state.check_update([local(p) for p in have], [local(p.grad) for p in have],
                                 [local(s["exp_avg"]) for s in states], [local(s["exp_avg_sq"]) for s in states],
                                 where=where(have))
        for key in ("score", "mask"):
            chosen = [p for p, s in zip(have, states) if key in s]
            if chosen:
                values = [local(self.state[p][key]) if key == "score" else self.state[p][key] for p in chosen]
                param_state.check_entries([local(p) for p in chosen], key, values, where(chosen))

    def _step_group(self, group, params, clip_coef, scaled=None):
        """Update `params` of `group`; `scaled` is the step's amp.ScaledStep, if any."""
        mask_of = dict(zip(map(id, params), self._upcoming_masks(group, params)))
        if scaled is not None:
            scaled.save_group(group, "dps_step")
            for param in params:
                scaled.save_state(self.state, param, STEP_STATE)
        group["dps_step"] += 1
        step = group["dps_step"]
        start, stage_steps = self._schedule(group)
        managed = group["dps"]
        explore = self._phase(group, step) == EXPLORE
        stage = stage_start(step, stage_steps, start)
        for param in params:
            state = self.state[param]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = param_state.zeros(param)
                state["exp_avg_sq"] = param_state.zeros(param)
            if managed and explore and "score" not in state:
                state["score"] = param_state.zeros(param)
            state["step"] += 1
        if managed and explore and group["variant"] == "mix":
            mix.accumulate_counts(self, params, stage)
        beta1, beta2 = (float(b) for b in group["betas"])
        lr = group["lr"]  # a tensor lr stays one: the reference then rounds as torch.optim.AdamW does
        hyper = dict(lr=lr.reshape(()) if isinstance(lr, torch.Tensor) else float(lr), beta1=beta1, beta2=beta2,
                     eps=float(group["eps"]), weight_decay=float(group["weight_decay"]))
        for device, on_device in _by_device(params).items():
            hyper["grad_coef"] = clip_coef
            if group["maximize"]:  # -g (the sign is exact; a score g*g does not see it)
                hyper["grad_coef"] = self._minus_one(device) if clip_coef is None else -clip_coef
            if scaled is not None:
                hyper["inv_scale"], hyper["found_inf"] = scaled.scalars(device)
            states = [self.state[p] for p in on_device]
            # DTensors: each rank updates its shard (the check once per list, not per tensor)
            local = distributed.local if any(map(distributed.is_dtensor, on_device)) else _same
            lists = dict(params=[local(p) for p in on_device], grads=[local(p.grad) for p in on_device],
                         exp_avgs=[local(s["exp_avg"]) for s in states],
                         exp_avg_sqs=[local(s["exp_avg_sq"]) for s in states], steps=[s["step"] for s in states])
            backend = self._backend_for(device, group)
            if managed and explore:
                backend.update(**lists, **hyper, scores=[local(s["score"]) for s in states],
                               reset_scores=[s.get("score_stage") != stage for s in states])
                for state in states:
                    state["score_stage"] = stage
            elif managed:
                device_masks = [mask_of[id(p)] for p in on_device]
                masked = [i for i, m in enumerate(device_masks) if m is not None]
                dense = [i for i, m in enumerate(device_masks) if m is None]
                if masked:
                    backend.update(**_pick(lists, masked), **hyper, masks=[device_masks[i] for i in masked],
                                   freeze=group["masked"] == "freeze")
                if dense:  # no score from the stage before (joined since, or a new schedule): update densely
                    backend.update(**_pick(lists, dense), **hyper)
            else:
                backend.update(**lists, **hyper)


def _unpack(param, bits):
    """The bool mask of `param` from its packed mask (a DTensor for a DTensor param)."""
    if distributed.is_dtensor(param):
        return distributed.unpacked_mask(param, bits)
    return selection.unpack_mask(bits, param.shape)


def _same(tensor):
    return tensor


def _by_device(items, device_of=lambda tensor: tensor.device):
    groups = {}
    for item in items:
        groups.setdefault(device_of(item), []).append(item)
    return groups


def _pick(lists, indices):
    return {name: [values[i] for i in indices] for name, values in lists.items()}
