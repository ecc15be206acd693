"""DPSAdamW: AdamW that fine-tunes adaptively selected subnetworks (DPS).

Validation, state, schedule and dispatch live here; the arithmetic of an
update lives in the backends (dps_fast/backends), the forward-side mixing of
DPS-Mix in dps_fast/mix.py.
"""
import numbers
import warnings

import torch
from torch.optim import Optimizer

from . import amp, backends, distributed, mix, selection
from .schedule import EXPLORE, phase_of, stage_of, stage_steps_from

VARIANTS = ("dense", "mix")
MASKED = ("grad", "freeze")
# The per-parameter state a step writes on the host (undone if GradScaler skips it).
STEP_STATE = ("step", "exp_avg", "exp_avg_sq", "score", "score_stage", "mix_count")


def _check_hyperparameters(group):
    """Raise ValueError/TypeError naming the first invalid hyperparameter of `group`."""
    for name in ("lr", "eps", "weight_decay"):
        value = group[name]
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{name} must be a real number >= 0; got {value!r}")
    betas = group["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, numbers.Real) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be a pair of numbers in [0, 1); got {betas!r}")
    sparsity = group["sparsity"]
    if not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1); got {sparsity!r}")
    stage_steps = group["stage_steps"]
    if not isinstance(stage_steps, numbers.Integral) or isinstance(stage_steps, bool) or stage_steps < 1:
        raise ValueError(f"stage_steps must be an integer >= 1; got {stage_steps!r}")
    if group["variant"] not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {group['variant']!r}")
    if group["masked"] not in MASKED:
        raise ValueError(f"masked must be one of {MASKED}; got {group['masked']!r}")
    if not isinstance(group["dps"], bool):
        raise TypeError(f"dps must be True or False; got {group['dps']!r}")


def _check_params(params):
    for param in params:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"params must be tensors; got {type(param).__name__}")
        if param.is_complex():
            raise TypeError(f"params must be real floating-point tensors; got a {param.dtype} tensor")
        if not param.is_floating_point():
            raise TypeError(f"params must be floating-point tensors; got a {param.dtype} tensor")


def _resolve_stage_steps(stage_steps, total_steps, stage_ratio):
    """T from stage_steps, or from total_steps * stage_ratio as published."""
    if stage_steps is not None:
        if total_steps is not None:
            raise ValueError("give either stage_steps or total_steps (with stage_ratio), not both")
        return stage_steps
    if total_steps is None:
        raise ValueError("stage length missing: give stage_steps (an integer >= 1) or total_steps "
                         "(T = int(total_steps * stage_ratio))")
    if not isinstance(total_steps, numbers.Integral) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1; got {total_steps!r}")
    if not isinstance(stage_ratio, numbers.Real) or not 0 < stage_ratio <= 1:
        raise ValueError(f"stage_ratio must be a number in (0, 1]; got {stage_ratio!r}")
    stage_steps = stage_steps_from(total_steps, stage_ratio)
    if stage_steps < 1:
        raise ValueError(f"stage_steps = int(total_steps * stage_ratio) = int({total_steps} * {stage_ratio}) "
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
        params: tensors or param groups. A group may override any argument
            below except backend; a group with "dps": False is plain AdamW.
        lr, betas, eps, weight_decay: as in torch.optim.AdamW.
        sparsity: fraction of each managed tensor frozen in exploitation stages.
        stage_steps: stage length T; or give total_steps and stage_ratio
            (T = int(total_steps * stage_ratio)).
        variant: "dense" (DPS-Dense) or "mix" (DPS-Mix; call attach_mix(model)).
        masked: "grad" (published: masked entries get a zero gradient, their
            moments and weight decay go on) or "freeze" (masked entries keep
            their value, moments, and get no weight decay).
        backend: "auto" or one of dps_fast.backends.BACKEND_NAMES.

    Math and state are fp32 whatever the parameter dtype; a bf16/fp16
    parameter is rounded to its own dtype after each update.

    Under a GradScaler, step() takes the loss scale and found_inf on the
    device and never waits for them (dps_fast.amp): until the next step(),
    group["dps_step"] and per-tensor steps count the last step provisionally.
    """

    _step_supports_amp_scaling = True  # GradScaler: pass grad_scale/found_inf, skip in the kernels

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 sparsity=0.3, stage_steps=None, total_steps=None, stage_ratio=0.05,
                 variant="dense", masked="grad", backend="auto"):
        backends.check_name(backend)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, sparsity=sparsity,
                        stage_steps=_resolve_stage_steps(stage_steps, total_steps, stage_ratio),
                        variant=variant, masked=masked, dps=True)
        _check_hyperparameters(defaults)
        self.backend = backend
        self._backend_by_device = {}
        self._pending_clip = None
        self._group_index = None
        self._unconfirmed = None  # the last step's amp.ScaledStep until its found_inf is read
        super().__init__(params, defaults)

    # ----- param groups and state -------------------------------------------------

    def add_param_group(self, param_group):
        """Add a group; it joins the optimizer's step count (and so its stage)."""
        self._confirm_last_step()
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict; got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        _check_params(params)
        _check_hyperparameters({**self.defaults, **param_group})
        for param in params:  # fail now, not at the first step, if the backend cannot run there
            self._backend_for(param.device)
        distributed.check_group({**self.defaults, **param_group, "params": params})
        param_group = {**param_group, "params": params}
        param_group.setdefault("dps_step", self.param_groups[0]["dps_step"] if self.param_groups else 0)
        super().add_param_group(param_group)
        self._group_index = None

    def __setstate__(self, state):
        super().__setstate__(state)
        self._group_index = None
        self._unconfirmed = None

    def state_dict(self):
        """As torch.optim.Optimizer.state_dict, less the per-shard masks of DTensor
        parameters (selected again after loading: dps_fast.distributed)."""
        self._confirm_last_step()
        state_dict = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        state_dict["state"] = {i: distributed.state_to_save(params[i], s) for i, s in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict):
        """As torch.optim.Optimizer.load_state_dict, but state tensors keep their
        saved dtype (fp32 moments and scores stay fp32 for bf16 parameters).
        DTensor parameters take full (unsharded) state tensors too."""
        self._unconfirmed = None  # the loaded state replaces whatever the last step did
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[param][key] = value.to(device=param.device, copy=True)
            if distributed.is_dtensor(param) and param in self.state:
                self.state[param] = distributed.loaded_state(param, self.state[param])

    def _group_of(self, param, required=True):
        """The param group holding `param` (None or ValueError if none does)."""
        lists = [id(g["params"]) for g in self.param_groups]  # accelerate's FSDP2 prepare swaps these lists
        if self._group_index is None or self._group_index[0] != lists:
            self._group_index = lists, {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        index = self._group_index[1].get(id(param))
        if index is None:
            if required:
                raise ValueError("param is not a parameter of this optimizer")
            return None
        return self.param_groups[index]

    def _backend_for(self, device):
        device = torch.device(device)
        if device not in self._backend_by_device:
            self._backend_by_device[device] = backends.resolve(self.backend, device)
        return self._backend_by_device[device]

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

    def _upcoming(self, group, with_stage=True):
        """(phase, stage) of the group's next step (stage None if not with_stage).

        While the last step is unconfirmed (GradScaler, dps_fast.amp), its
        found_inf is read only if the answer would differ had it been skipped:
        near stage boundaries, not within a stage."""
        def schedule(step):
            return self._phase(group, step), stage_of(step, group["stage_steps"]) if with_stage else None

        step = group["dps_step"] + 1
        last = self._unconfirmed
        if last is not None and last.advanced(group) and schedule(step) != schedule(step - 1):
            self._confirm_last_step()
            step = group["dps_step"] + 1
        return schedule(step)

    def _confirm_last_step(self):
        """Read the last step's found_inf; if it was skipped, undo its host-side changes."""
        last, self._unconfirmed = self._unconfirmed, None
        if last is not None and last.skipped():
            last.undo()

    def _phase(self, group, step):
        """The phase of optimizer step `step` of managed `group`: DPS alternates
        stages. The one place a subclass changes the schedule (every step
        exploits in ChildTuning, explores in Mixout: dps_fast.baselines)."""
        return phase_of(step, group["stage_steps"])

    def _ensure_masks(self, group, params, stage):
        """Give each managed param (with a score) the mask of exploitation stage
        `stage`, selecting it from the scores the first time it is asked for."""
        todo = [p for p in params if self.state[p].get("mask_stage") != stage and "score" in self.state[p]]
        whole = [p for p in todo if not distributed.is_dtensor(p)]
        sharded = [p for p in todo if distributed.is_dtensor(p)]
        selections = [(on_device, self._backend_for(device).select_masks)
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
        """Masks the next step applies (None for each param if it explores)."""
        if not group["dps"]:
            return [None] * len(params)
        phase, stage = self._upcoming(group)
        if phase == EXPLORE:
            return [None] * len(params)
        self._ensure_masks(group, params, stage)
        return [self.state[p].get("mask") for p in params]

    # ----- gradient clipping ------------------------------------------------------

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
                    masked.setdefault(param.device, []).append((param.grad, bits))
                else:
                    grads.append(param.grad * _unpack(param, bits))
                watched.append((param.grad, param.grad._version))
        for device, pairs in masked.items():  # the 2-norm of the per-tensor 2-norms is the total 2-norm
            grads.append(self._backend_for(device).masked_norms(*zip(*pairs)))
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
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:
                if param.grad.is_sparse:
                    raise RuntimeError("DPSAdamW does not support sparse gradients")
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

    def _step_group(self, group, params, clip_coef, scaled=None):
        """Update `params` of `group`; `scaled` is the step's amp.ScaledStep, if any."""
        mask_of = dict(zip(map(id, params), self._upcoming_masks(group, params)))
        if scaled is not None:
            scaled.save_group(group, "dps_step")
            for param in params:
                scaled.save_state(self.state, param, STEP_STATE)
        group["dps_step"] += 1
        step, stage_steps = group["dps_step"], group["stage_steps"]
        managed = group["dps"]
        explore = self._phase(group, step) == EXPLORE
        stage = stage_of(step, stage_steps)
        for param in params:
            state = self.state[param]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
            if managed and explore and "score" not in state:
                state["score"] = torch.zeros_like(param, dtype=torch.float32)
            state["step"] += 1
        if managed and explore and group["variant"] == "mix":
            mix.accumulate_counts(self, params, stage)
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], grad_coef=clip_coef)
        for device, on_device in _by_device(params).items():
            if scaled is not None:
                hyper["inv_scale"], hyper["found_inf"] = scaled.scalars(device)
            states = [self.state[p] for p in on_device]
            # DTensors: each rank updates its shard (the check once per list, not per tensor)
            local = distributed.local if any(map(distributed.is_dtensor, on_device)) else _same
            lists = dict(params=[local(p) for p in on_device], grads=[local(p.grad) for p in on_device],
                         exp_avgs=[local(s["exp_avg"]) for s in states],
                         exp_avg_sqs=[local(s["exp_avg_sq"]) for s in states], steps=[s["step"] for s in states])
            backend = self._backend_for(device)
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
                if dense:  # no score yet (joined during this exploitation stage): update densely
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


def _by_device(params):
    groups = {}
    for param in params:
        groups.setdefault(param.device, []).append(param)
    return groups


def _pick(lists, indices):
    return {name: [values[i] for i in indices] for name, values in lists.items()}
