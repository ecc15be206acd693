"""DPSAdamW: AdamW that fine-tunes adaptively selected subnetworks (DPS).

The class validates (dps_fast.options), owns the state (dps_fast.param_state;
state dicts: dps_fast.checkpoint) and the schedule; the step's arithmetic is
dps_fast.functional.dps_adamw, which calls a backend (dps_fast.backends). The
forward-side mixing of DPS-Mix is dps_fast.mix.

Extension points, for methods built on DPSAdamW (dps_fast.baselines) and
for DPS-Mix: override `schedule_phase` (which steps explore or exploit),
`make_masks` and `stage_mask` (the masks of an exploitation stage: made, then
read) and `gradient_factor` (a factor on the update's gradient); query
`group_of` and `upcoming`.
"""
import collections

import torch
from torch.optim import Optimizer

from . import amp, backends, checkpoint, clipping, distributed, functional, mix, options, param_state, selection
from . import rounding as rounding_bits
from . import state_format as formats
from .schedule import EXPLORE, phase_of, stage_start

# The per-parameter state a step writes on the host (undone if GradScaler skips it).
STEP_STATE = ("step", "exp_avg", "exp_avg_sq", *formats.SCALE_KEYS.values(), "score", "score_stage", "mix_count")

Upcoming = collections.namedtuple("Upcoming", "phase stage")  # of a group's next step; stage: its first step


class _Runtime:
    """What DPSAdamW keeps between calls that is not optimizer state."""

    def __init__(self):
        self.backends = {}  # (device, implementation) -> backend module
        self.constants = {}  # (device, value) -> a 0-dim gradient factor
        self.pending_clip = None  # clipping.Pending, until the next step()
        self.group_index = None  # id(param) -> (group, position), a cache of group_of
        self.unconfirmed = None  # the last step's amp.ScaledStep until its found_inf is read


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
            total_steps and stage_ratio, included: a group's stage_ratio alone
            applies to the optimizer's total_steps); a group with "dps": False
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
        state_dtype: "fp32" (default), "bf16" or "8bit": how exp_avg, exp_avg_sq and
            the score are stored (dps_fast.state_format; bf16 with stochastic rounding;
            8bit: block-wise 8-bit moments and a bf16 score, backend "torch" only so far).
        rounding: "nearest" (default) or "stochastic": how an updated bf16/fp16
            parameter is stored (dps_fast.rounding).
        seed: the seed of the stochastic-rounding bits (an integer in [0, 2**32),
            default 0: the same on every rank, as DDP replicas must round alike);
            each parameter's own seed, derived from it, is kept in its state.
        backend: "auto" or one of dps_fast.backends.BACKEND_NAMES.

    Math is fp32 whatever the parameter dtype and the state format (float64 for
    float64 parameters, whose state is float64): each entry is loaded, updated
    and stored once per step.

    Under a GradScaler, step() takes the loss scale and found_inf on the
    device and never waits for them (dps_fast.amp): until the next step(),
    group["dps_step"] and per-tensor steps count the last step provisionally.
    """

    _step_supports_amp_scaling = True  # GradScaler: pass grad_scale/found_inf, skip in the kernels

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 sparsity=0.3, stage_steps=None, total_steps=None, stage_ratio=0.05, variant="dense",
                 masked="grad", state_dtype="fp32", rounding="nearest", seed=0, backend="auto", maximize=False,
                 foreach=None, capturable=False, differentiable=False, fused=None):
        backends.check_name(backend)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused, sparsity=sparsity,
                        stage_steps=options.stage_steps(stage_steps, total_steps, stage_ratio),
                        stage_ratio=stage_ratio, variant=variant, masked=masked, state_dtype=state_dtype,
                        rounding=rounding, seed=seed, dps=True)
        # checked as a plain group (a group may give its own stage length), then as a managed one
        options.check_group({**defaults, "dps": False}, backend)
        if defaults["stage_steps"] is not None:
            options.check_group(defaults, backend)
        self.backend = backend
        self.total_steps = total_steps  # a group's own stage_ratio applies to it
        self._mix_handles = []  # the live attach_mix attachments (not state: never saved, kept by a load)
        self._reset_transient()
        super().__init__(params, defaults)

    def _reset_transient(self):
        """Caches and per-step bookkeeping, not part of the optimizer's state (nor of its
        pickle), in one shared object: a wrapper that copies the optimizer's __dict__
        (Lightning's LightningOptimizer) then shares it instead of shadowing it, also
        after a load_state_dict (which resets it in place)."""
        if "_runtime" in self.__dict__:
            self._runtime.__init__()
        else:
            self._runtime = _Runtime()

    def __getstate__(self):
        self._confirm_last_step()
        return {**super().__getstate__(), "backend": self.backend, "total_steps": self.total_steps}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("total_steps", None)
        self.__dict__.setdefault("_mix_handles", [])
        self._reset_transient()

    # ----- param groups and state -------------------------------------------------

    def add_param_group(self, param_group):
        """Add a group; it joins the optimizer's step count (and so its stage)."""
        self._confirm_last_step()
        where = f"param group {len(self.param_groups)}: "
        param_group = options.normalized_group(param_group, self.defaults["stage_ratio"], self.total_steps, where)
        params = param_group["params"]
        group = {**self.defaults, **param_group, "params": params}
        options.check_group(group, self.backend, where)
        for param in params:  # fail now, not at the first step, if the backend cannot run there
            self._backend_for(param.device, group)
        distributed.check_group(group)
        first = self.param_groups[0] if self.param_groups else {}
        param_group["dps_step"] = param_group.get("dps_step", first.get("dps_step", 0))
        param_group.setdefault("schedule_start", first.get("schedule_start", 0))
        param_group.setdefault("schedule_stage_steps", group["stage_steps"])
        super().add_param_group(param_group)
        self._runtime.group_index = None

    def state_dict(self):
        """As torch.optim.Optimizer.state_dict, less the per-shard masks of DTensor
        parameters (selected again after loading: dps_fast.distributed)."""
        self._confirm_last_step()
        return checkpoint.saved(self, super().state_dict())

    def load_state_dict(self, state_dict):
        """As torch.optim.Optimizer.load_state_dict (hooks included), except that every
        entry is checked and converted before anything changes, a torch.optim.AdamW
        state dict migrates, and DTensor parameters take full state tensors too
        (dps_fast.checkpoint says how)."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, groups = checkpoint.loaded(self, state_dict)
        self.__setstate__({"state": state, "param_groups": groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def group_of(self, param, required=True):
        """The param group holding `param` (None or ValueError if none does)."""
        groups = self.param_groups
        index = self._runtime.group_index
        found = None if index is None else index.get(id(param))
        if found is None or found[0] >= len(groups) or found[1] >= len(groups[found[0]]["params"]) \
                or groups[found[0]]["params"][found[1]] is not param:
            # params were added, swapped in place (accelerate's FSDP2 prepare) or removed: index again
            index = {id(p): (i, j) for i, g in enumerate(groups) for j, p in enumerate(g["params"])}
            self._runtime.group_index = index
            found = index.get(id(param))
        if found is None:
            if required:
                raise ValueError("param is not a parameter of this optimizer")
            return None
        return groups[found[0]]

    def _backend_for(self, device, group=None):
        """The backend module for `group`'s tensors on `device` (its fused/foreach flags and
        state format)."""
        device = torch.device(device)
        key = (device, None, "fp32") if group is None else (device, options.implementation(group),
                                                             group["state_dtype"])
        if key not in self._runtime.backends:
            self._runtime.backends[key] = backends.resolve(self.backend, device, key[1], key[2])
        return self._runtime.backends[key]

    # ----- public queries ---------------------------------------------------------

    @property
    def phase(self):
        """"explore" or "exploit": the phase of the next step() (of the first
        managed group; groups may set their own stage_steps)."""
        for group in self.param_groups:
            if group["dps"]:
                return self.upcoming(group, with_stage=False).phase
        return EXPLORE

    def mask(self, param):
        """The bool mask (param's shape) of the latest exploitation stage, or None
        before the first one (and for tensors not managed by DPS)."""
        self.group_of(param)
        bits = self.state.get(param, {}).get("mask")
        return None if bits is None else param_state.bool_mask(param, bits)

    def attach_mix(self, model):
        """Route the forward pass of `model` through DPS-Mix mixing (see
        dps_fast.mix.attach). Returns a handle with .remove()."""
        return mix.attach(self, model)

    def detach_mix(self):
        """Undo every attach_mix of this optimizer: the models' modules get their own
        forward back (the integrations call it when their run ends)."""
        for handle in list(self._mix_handles):
            handle.remove()

    # ----- schedule: the extension points and their queries ---------------------------

    def schedule_phase(self, group, step):
        """Extension point: the phase ("explore" or "exploit") of optimizer step `step`
        of managed `group`. DPS alternates stages of group["stage_steps"] steps;
        ChildTuning exploits at every step, Mixout explores (dps_fast.baselines)."""
        start, stage_steps = self._schedule(group)
        return phase_of(step, stage_steps, start)

    def make_masks(self, group, params, stage):
        """Extension point: give each param of managed `group` its packed mask of
        exploitation stage `stage` (state "mask", tagged "mask_stage" = stage), or
        none (the param is then updated densely). DPS selects each tensor's top
        ceil(N * (1 - sparsity)) scores of the exploration stage just before
        `stage`, once per stage."""
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

    def gradient_factor(self, group):
        """Extension point: a number the gradient of `group`'s update is multiplied
        by (after scoring, with the clip factor), or None. DPS: None; ChildTuning-F: 1/q."""
        return None

    def upcoming(self, group, with_stage=True):
        """Upcoming(phase, stage) of the group's next step (stage None unless
        with_stage). A stage is named by its first step (dps_fast.schedule.stage_start).

        While the last step is unconfirmed (GradScaler, dps_fast.amp), its
        found_inf is read only if the answer would differ had it been skipped:
        near stage boundaries, not within a stage."""
        def schedule(step):
            start, stage_steps = self._schedule(group)
            return Upcoming(self.schedule_phase(group, step),
                            stage_start(step, stage_steps, start) if with_stage else None)

        step = group["dps_step"] + 1
        last = self._runtime.unconfirmed
        if last is not None and last.advanced(group) and schedule(step) != schedule(step - 1):
            self._confirm_last_step()
            step = group["dps_step"] + 1
        return schedule(step)

    def stage_mask(self, param, stage):
        """Extension point (with make_masks): param's packed mask of exploitation stage
        `stage`, or None. DPS: the one make_masks tagged with `stage`; ChildTuning-D: its fixed mask."""
        state = self.state[param]
        return state["mask"] if state.get("mask_stage") == stage else None

    def _schedule(self, group):
        """(start, T) of the group's schedule; a changed stage_steps starts a new
        schedule after the steps taken so far."""
        if group["schedule_stage_steps"] != group["stage_steps"]:
            group["schedule_start"], group["schedule_stage_steps"] = group["dps_step"], group["stage_steps"]
        return group["schedule_start"], group["stage_steps"]

    def _confirm_last_step(self):
        """Read the last step's found_inf; if it was skipped, undo its host-side changes."""
        runtime = self.__dict__.get("_runtime")  # absent while unpickling
        if runtime is None:
            return
        last, runtime.unconfirmed = runtime.unconfirmed, None
        if last is not None and last.skipped():
            last.undo()

    def _selection_score(self, param, group):
        state = self.state[param]
        if group["variant"] == "mix":
            return selection.mix_normalised_score(state["score"], state["mix_count"], group["stage_steps"])
        return state["score"]

    def _next_masks(self, group, params):
        """The packed masks the next step applies: one per param, None where it is
        updated densely (every param when it explores or is not managed)."""
        if not group["dps"]:
            return [None] * len(params)
        phase, stage = self.upcoming(group)
        if phase == EXPLORE:
            return [None] * len(params)
        self.make_masks(group, params, stage)
        return [self.stage_mask(p, stage) for p in params]

    # ----- gradient clipping ------------------------------------------------------

    @torch.compiler.disable  # as step(): it reads the schedule, which changes every step
    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False):
        """Clip the gradients the next step() applies (masked in exploitation
        stages) to total norm `max_norm`, as published code does after masking
        in autograd (dps_fast.clipping). Returns the total norm before clipping.
        The factor is applied inside the next step(); p.grad is left as is."""
        entries = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            entries += [(param, bits, self._backend_for(param.device, group))
                        for param, bits in zip(params, self._next_masks(group, params))]
        total_norm, factor = clipping.clip_factor(entries, max_norm, norm_type, error_if_nonfinite)
        self._runtime.pending_clip = clipping.Pending(factor, [param.grad for param, _, _ in entries])
        return total_norm

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        self._runtime.pending_clip = None
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
        work, changes = [], {}
        for index, group in enumerate(self.param_groups):
            options.check_group(group, self.backend, f"param group {index}: ")
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:
                if param.grad.is_sparse:
                    raise RuntimeError("DPSAdamW does not support sparse gradients")
            group_changes = param_state.format_changes(self.state, group, params)
            param_state.check_group(self.state, group, params, index, group_changes)
            distributed.check_group(group)  # a DTensor layout the step cannot take: now, not halfway
            for device in {param.device for param in params}:  # a backend that cannot run: now, not halfway
                self._backend_for(device, group)
            if group["dps"] and group["variant"] == "mix":
                mix.check_mixed(self, params)
            work.append((group, params))
            changes.update(group_changes)
        for param, entry in changes.items():  # a state_dtype changed by hand: the state converted
            state = self.state[param]
            state.clear()
            state.update(entry)
        pending, self._runtime.pending_clip = self._runtime.pending_clip, None
        clip_coef = None if pending is None else pending.factor_for(
            [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None])
        scaled = amp.ScaledStep.of(self)
        for group, params in work:
            self._step_group(group, params, clip_coef, scaled)
        mix.reset_keep(self)
        if scaled is not None:
            scaled.queued()
            self._runtime.unconfirmed = scaled
        return loss

    def _init_group(self, group, params, explore):
        """The states of `params`, created where missing (a score too when a managed
        group explores; a rounding seed where the step draws random bits), with each
        tensor's bias-correction step advanced."""
        states, format = [], formats.of(group["state_dtype"])
        for param in params:
            state = self.state[param]
            if "step" not in state:
                state["step"] = 0
                state.update(param_state.zero_state(param, format.name, ("exp_avg", "exp_avg_sq")))
            if explore and "score" not in state:
                state["score"] = param_state.zeros(param, format.name, "score")
            if "round_seed" not in state and formats.needs_random_bits(format, group["rounding"], param):
                # the group's seed and the parameter's place in the optimizer: the same on every rank
                state["round_seed"] = rounding_bits.mix32(group["seed"] ^ rounding_bits.mix32(self._position(param)))
            state["step"] += 1
            states.append(state)
        return states

    def _position(self, param):
        """The index of `param` among all the optimizer's parameters, group after group."""
        self.group_of(param)  # indexes the parameters when they changed
        index, position = self._runtime.group_index[id(param)]
        return sum(len(g["params"]) for g in self.param_groups[:index]) + position

    def _grad_coef(self, group, clip_coef, device):
        """The 0-dim factor on the gradient `group`'s update uses (after scoring): the
        pending clip, times gradient_factor, times -1 for maximize; None if 1."""
        factor = self.gradient_factor(group)
        scale = (1.0 if factor is None else factor) * (-1.0 if group["maximize"] else 1.0)
        if scale == 1.0:
            return clip_coef
        if clip_coef is not None:
            return clip_coef * scale  # exact for the sign, as torch.optim.AdamW's -grad
        if (device, scale) not in self._runtime.constants:
            self._runtime.constants[device, scale] = torch.full((), scale, device=device)
        return self._runtime.constants[device, scale]

    def _step_group(self, group, params, clip_coef, scaled=None):
        """Update `params` of `group`; `scaled` is the step's amp.ScaledStep, if any."""
        masks = self._next_masks(group, params)
        if mix.is_mixed(group):  # the exploitation targets of tensors no forward of the stage used yet
            upcoming = self.upcoming(group)
            if upcoming.phase != EXPLORE:
                mix.take_snapshots(self, group["params"], upcoming.stage)
        if scaled is not None:
            scaled.save_group(group, "dps_step")
            for param in params:
                scaled.save_state(self.state, param, STEP_STATE)
        group["dps_step"] += 1
        phase = self.schedule_phase(group, group["dps_step"]) if group["dps"] else functional.PLAIN
        stage = None  # named only where scores are kept: a plain group may have no stage length
        if phase == EXPLORE:
            start, stage_steps = self._schedule(group)
            stage = stage_start(group["dps_step"], stage_steps, start)
        states = self._init_group(group, params, explore=phase == EXPLORE)
        if phase == EXPLORE and group["variant"] == "mix":
            mix.accumulate_counts(self, params, stage)
        lr = group["lr"]  # a tensor lr stays one: the reference then rounds as torch.optim.AdamW does
        hyper = dict(lr=lr.reshape(()) if isinstance(lr, torch.Tensor) else float(lr),
                     beta1=float(group["betas"][0]), beta2=float(group["betas"][1]), eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]), freeze=group["masked"] == "freeze",
                     state_format=group["state_dtype"], rounding=group["rounding"])
        quantized = formats.of(group["state_dtype"]).quantized
        for device, chosen in _by_device(range(len(params)), lambda i: params[i].device).items():
            def pick(values):
                return [values[i] for i in chosen]

            def scales(key):  # an 8-bit moment's block scales (None for the tensors kept in floats)
                return [states[i].get(key) for i in chosen] if quantized else None

            scalars = dict(zip(("inv_scale", "found_inf"), scaled.scalars(device))) if scaled is not None else {}
            explore = phase == EXPLORE
            functional.dps_adamw(
                pick(params), [params[i].grad for i in chosen], [states[i]["exp_avg"] for i in chosen],
                [states[i]["exp_avg_sq"] for i in chosen], [states[i]["step"] for i in chosen],
                backend=self._backend_for(device, group), phase=phase, **hyper, **scalars,
                grad_coef=self._grad_coef(group, clip_coef, device),
                scores=[states[i]["score"] for i in chosen] if explore else None,
                reset_scores=[states[i].get("score_stage") != stage for i in chosen] if explore else None,
                masks=pick(masks), seeds=[states[i].get("round_seed") for i in chosen],
                exp_avg_scales=scales("exp_avg_scale"), exp_avg_sq_scales=scales("exp_avg_sq_scale"))
        if phase == EXPLORE:
            for state in states:
                state["score_stage"] = stage


def _by_device(items, device_of=lambda tensor: tensor.device):
    groups = {}
    for item in items:
        groups.setdefault(device_of(item), []).append(item)
    return groups

