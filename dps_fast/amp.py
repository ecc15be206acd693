"""GradScaler without a host sync: torch's `_step_supports_amp_scaling` protocol.

With it, `scaler.step(opt)` always calls `opt.step()` and hands it the loss
scale (`opt.grad_scale`, None once `scaler.unscale_(opt)` ran) and a
device-side `opt.found_inf`, instead of reading found_inf on the host and
skipping step() itself (one sync per step). The kernels unscale the gradient
and, when found_inf is nonzero, write nothing. What step() changes on the
host (step counts, the score stage, new state entries) is recorded in a
ScaledStep and undone if the step turns out skipped, which the optimizer
learns at its next step: found_inf is copied to pinned memory behind the
step's kernels, and by the next step() the GPU has long produced it (a
wait happens only when the CPU runs more than one step ahead). Anything
that needs the exact count earlier (state_dict(), a schedule query at a
stage boundary) confirms then.
"""
import torch


class ScaledStep:
    """One step() under a GradScaler: the unscale factor and found_inf per
    device for the kernels, and the host-side changes to undo if skipped."""

    def __init__(self, grad_scale, found_inf):
        self._grad_scale, self._found_inf = grad_scale, found_inf
        self._scalars = {}
        self._groups_saved = []  # (group, key, value before this step)
        self._states_saved = []  # (states, param, keys, a copy of states[param] before this step or None)
        self._groups = set()  # ids of the param groups this step advanced
        self._flag = self._event = None

    @classmethod
    def of(cls, optimizer):
        """The ScaledStep of this step() if a GradScaler drives it, else None."""
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is None:
            return None
        if not isinstance(found_inf, torch.Tensor):  # GradScaler's sum over no gradients is the int 0
            found_inf = torch.tensor(float(found_inf))
        return cls(getattr(optimizer, "grad_scale", None), found_inf)

    def scalars(self, device):
        """(inv_scale or None, found_inf), 0-dim fp32 tensors on `device`."""
        if device not in self._scalars:
            # a CPU kernel reads its scalars at once: a copy to the CPU must be complete
            non_blocking = torch.device(device).type != "cpu"
            inv_scale = None
            if self._grad_scale is not None:  # as GradScaler.unscale_ computes it
                inv_scale = self._grad_scale.double().reciprocal().float().to(device, non_blocking=non_blocking)
            found_inf = self._found_inf.to(device=device, dtype=torch.float32, non_blocking=non_blocking)
            self._scalars[device] = inv_scale, found_inf
        return self._scalars[device]

    def save_group(self, group, key):
        """Remember group[key] as it is before this step."""
        self._groups.add(id(group))
        self._groups_saved.append((group, key, group[key]))

    def save_state(self, states, param, keys):
        """Remember `keys` of states[param] (or that there is none) as before this step."""
        state = states.get(param)  # .get: no entry is created in a defaultdict
        self._states_saved.append((states, param, keys, None if state is None else state.copy()))

    def advanced(self, group):
        """Whether this step advanced `group`'s step count."""
        return id(group) in self._groups

    def queued(self):
        """Call after the step's kernels are queued: start bringing found_inf to the host."""
        found_inf = self._found_inf
        if found_inf.is_cuda:
            self._flag = torch.empty((), dtype=found_inf.dtype, pin_memory=True)
            self._flag.copy_(found_inf, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(found_inf.device))
        else:
            self._flag = found_inf.clone()  # read later; GradScaler may reuse its tensor
        self._grad_scale = self._found_inf = None
        self._scalars = {}

    def skipped(self):
        """Whether GradScaler found an inf/nan, i.e. the kernels wrote nothing."""
        if self._event is not None and not self._event.query():
            self._event.synchronize()  # only when the CPU is more than a step ahead
        return self._flag.item() != 0

    def undo(self):
        """Restore what step() changed on the host."""
        for group, key, value in self._groups_saved:
            group[key] = value
        for states, param, keys, saved in self._states_saved:
            if saved is None:
                states.pop(param, None)
                continue
            state = states[param]
            for key in keys:
                if key in saved:
                    state[key] = saved[key]
                else:
                    state.pop(key, None)


def unscale_once(scaler, optimizer):
    """scaler.unscale_(optimizer) unless it already ran for this step (the clip
    helpers of dps_fast.integrations call it before opt.clip_grad_norm_)."""
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
