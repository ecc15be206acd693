"""DPS as the published code does it: autograd hooks, a full sort, plain AdamW.

An independent port of the published mechanism, written from the spec
(../shared/dps-spec.md) and not from DPSAdamW, for two uses: the parity tests
(DPSAdamW must take the same steps) and the benchmark baseline
"published-style DPS" (hence the full descending torch.sort per tensor at
each stage boundary: that is the published cost, kept on purpose).

- Every managed weight gets a gradient hook: in exploration stages it
  accumulates score = g * g (restarted at each exploration stage); in
  exploitation stages it returns g * mask. The mask is selected at the first
  exploitation step of a stage. The update is a plain torch.optim.AdamW, so
  masking comes before clipping, as published.
- DPS-Mix replaces the forward of each managed nn.Linear with Mixout mixing
  toward W0 (exploration) or a stage snapshot (exploitation).
- masked="freeze" saves the masked-out entries (value and AdamW moments)
  before the AdamW step and puts them back after it.

One published quirk is fixed: the schedule counts optimizer steps (calls of
step()), not forward calls, so gradient accumulation and forward passes in
training mode without a step (e.g. evaluation) do not shift the stages.
Hooks still see each backward pass, so with several backward passes per
step the score sums per-pass squares (DPSAdamW squares the summed
gradient): parity with DPSAdamW holds for one backward pass per step.
"""
import functools
import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn


def _kept(numel, sparsity):
    """k = ceil(N * (1 - p)) with p taken as the decimal it was written as."""
    return math.ceil(numel * (1 - Fraction(repr(float(sparsity)))))


def _select(score, sparsity):
    """Keep the k top scores, ties at the k-th kept: a full descending sort."""
    if score.numel() == 0:
        return torch.ones_like(score, dtype=torch.bool)
    ordered = torch.sort(score.reshape(-1), descending=True).values
    return score >= ordered[_kept(score.numel(), sparsity) - 1]


class _Mixout(torch.autograd.Function):
    """W_eff = ((1 - m) * target + m * W - p * target) / (1 - p); W gets g_eff * m."""

    @staticmethod
    def forward(ctx, weight, target, keep, sparsity, on_backward):
        ctx.save_for_backward(keep)
        ctx.on_backward = on_backward
        return ((1 - keep) * target + keep * weight - sparsity * target) / (1 - sparsity)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        if ctx.on_backward is not None:
            ctx.on_backward(keep)
        return grad * keep, None, None, None, None


class PublishedDPS:
    """DPS-Dense / DPS-Mix the published way around a torch.optim.AdamW.

    param_groups: as from dps_fast.param_groups(model); groups with
    "dps": False are plain AdamW, the others are managed. variant: "dense" or
    "mix"; masked: "grad" (published) or "freeze". Call zero_grad, backward,
    optionally clip_grad_norm_, then step, as with any optimizer.
    """

    def __init__(self, model, param_groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 sparsity=0.3, stage_steps=None, variant="dense", masked="grad"):
        if stage_steps is None or stage_steps < 1:
            raise ValueError(f"stage_steps must be an integer >= 1; got {stage_steps!r}")
        if variant not in ("dense", "mix"):
            raise ValueError(f"variant must be 'dense' or 'mix'; got {variant!r}")
        if masked not in ("grad", "freeze"):
            raise ValueError(f"masked must be 'grad' or 'freeze'; got {masked!r}")
        self.sparsity, self.stage_steps, self.variant, self.masked = sparsity, stage_steps, variant, masked
        groups = [{k: v for k, v in g.items() if k != "dps"} for g in param_groups]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.managed = [p for g, pg in zip(param_groups, self.optimizer.param_groups)
                        if g.get("dps", True) for p in pg["params"]]
        self.steps = 0  # optimizer steps taken
        self.state = {p: {} for p in self.managed}  # score, score_stage, mask, mask_stage, mix state
        self.hooks = [p.register_hook(functools.partial(self._hook, p)) for p in self.managed]
        self.mixed_modules = []
        if variant == "mix":
            managed_ids = {id(p) for p in self.managed}
            for module in model.modules():
                if isinstance(module, nn.Linear) and any(
                        t is not None and id(t) in managed_ids for t in (module.weight, module.bias)):
                    if "forward" in module.__dict__:
                        raise RuntimeError(f"{module} already has its forward replaced")
                    module.forward = functools.partial(self._mixed_forward, module)
                    self.mixed_modules.append(module)
            for p in self.managed:
                self.state[p]["target0"] = p.detach().clone()  # W0

    # ----- schedule (of the next step) -------------------------------------------

    @property
    def _stage(self):
        return self.steps // self.stage_steps + 1  # ceil((steps + 1) / T)

    @property
    def phase(self):
        return "explore" if self._stage % 2 == 1 else "exploit"

    # ----- selection --------------------------------------------------------------

    def mask(self, param):
        """The bool mask of the latest exploitation stage (None before the first)."""
        return self.state.get(param, {}).get("mask")

    def _current_mask(self, param):
        """The mask of the current exploitation stage, selected on first use."""
        state = self.state[param]
        if state.get("mask_stage") != self._stage:
            if "score" not in state:  # never scored: nothing to select from, update densely
                return None
            score = state["score"]
            if self.variant == "mix":
                count = state["count"]
                score = score / torch.clamp(count, min=1.0)
                if self.stage_steps >= 50:
                    score = score * torch.exp(-count / self.stage_steps)
            state["mask"] = _select(score, self.sparsity)
            state["mask_stage"] = self._stage
        return state["mask"]

    # ----- autograd side ----------------------------------------------------------

    def _hook(self, param, grad):
        state = self.state[param]
        if self.phase == "explore":
            if state.get("score_stage") != self._stage:
                state["score"] = (grad * grad).float()
                state["score_stage"] = self._stage
            else:
                state["score"] += grad * grad
            return None
        mask = self._current_mask(param)
        return None if mask is None else grad * mask

    def _count(self, param, keep):
        state = self.state[param]
        if state.get("count_stage") != self._stage:
            state["count"] = keep.float()
            state["count_stage"] = self._stage
        else:
            state["count"] += keep

    def _mixed(self, param):
        state = self.state.get(param)
        if param is None or state is None:
            return param
        if self.phase == "explore":
            shape = param.shape[-1:] if param.dim() == 2 else param.shape
            keep = torch.empty(shape, dtype=param.dtype, device=param.device).bernoulli_(1 - self.sparsity)
            return _Mixout.apply(param, state["target0"], keep, self.sparsity,
                                 functools.partial(self._count, param))
        if state.get("snapshot_stage") != self._stage:
            state["snapshot"] = param.detach().clone()
            state["snapshot_stage"] = self._stage
        mask = self._current_mask(param)
        keep = torch.ones_like(param) if mask is None else mask.to(param.dtype)
        return _Mixout.apply(param, state["snapshot"], keep, self.sparsity, None)

    def _mixed_forward(self, module, input):
        if not module.training:
            return F.linear(input, module.weight, module.bias)
        return F.linear(input, self._mixed(module.weight), self._mixed(module.bias))

    # ----- optimizer side ---------------------------------------------------------

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def clip_grad_norm_(self, max_norm):
        """Clip all gradients (already masked by the hooks) to total norm max_norm."""
        return torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], max_norm)

    @torch.no_grad()
    def step(self):
        frozen = []
        if self.masked == "freeze" and self.phase == "exploit":
            for param in self.managed:
                mask = self._current_mask(param) if param.grad is not None else None
                if mask is not None:
                    adam = self.optimizer.state[param]
                    saved = [t.clone() for t in (param, adam["exp_avg"], adam["exp_avg_sq"])]
                    frozen.append((mask, [param, adam["exp_avg"], adam["exp_avg_sq"]], saved))
        self.optimizer.step()
        for mask, tensors, saved in frozen:
            for tensor, old in zip(tensors, saved):
                tensor.copy_(torch.where(mask, tensor, old))
        self.steps += 1

    def remove(self):
        """Remove the hooks and give the mixed modules their own forward back."""
        for hook in self.hooks:
            hook.remove()
        for module in self.mixed_modules:
            module.__dict__.pop("forward", None)
        self.hooks, self.mixed_modules = [], []
