"""The comparison methods of the DPS paper, on DPSAdamW's own machinery.

DPSAdamW does three things per managed tensor, each an extension point:
decide the phase of a step (`schedule_phase`), provide the masks of an
exploitation stage (`make_masks`), and run one fused update (scored in
exploration, masked in exploitation, its gradient times `gradient_factor`).
Each baseline overrides only what it changes, never the update itself:

- ChildTuning-F (Xu et al., EMNLP 2021, task-free): every step exploits
  (`schedule_phase`), with a fresh Bernoulli(q) mask per managed tensor and
  step (`make_masks`, stage length 1 so every step is its own stage), and
  the masked gradient is multiplied by 1/q (`gradient_factor`).
- ChildTuning-D (task-driven): every step exploits with one fixed mask per
  tensor, chosen before training by `fisher_masks` (squared gradients over
  one pass of the training data, ONE threshold over all managed tensors
  keeping the top q fraction), no rescaling.
- Mixout (Lee et al., ICLR 2020): DPS-Mix's exploration mixing toward the
  pre-trained weights W0 at every step (`schedule_phase` always explores); the
  exploration scores are computed and never used.

Managed tensors: DPS and Mixout manage what `dps_fast.param_groups` manages
(every nn.Linear weight: encoder, pooler, classifier). ChildTuning masks
encoder tensors only, as its published code and the spec say: the managed
nn.Linear weights whose name contains "layer" (its code also masks the
encoder's biases and LayerNorm; here those stay dense, as in DPS).

Published defaults, not tuned: q = 0.3 for both ChildTuning variants (the
spec's value; the ChildTuning paper searches q in 0.1-0.4); Mixout's mixing
probability is DPS's sparsity p = 0.3 with DPS-Mix's mask layout (one draw
per input column) and gradient (g_eff * m, no 1/(1-p)).

Gradient clipping follows each method's published code: DPS and Mixout mask
(or mix) inside autograd and then clip, so they use `opt.clip_grad_norm_`;
ChildTuning clips the raw gradients (the Trainer's clip) before its
optimizer masks them, so it uses torch.nn.utils.clip_grad_norm_. The Fisher
pass clips each tensor's gradient to max_grad_norm separately, as published.
"""
import torch

from . import selection
from .groups import param_groups
from .optimizer import DPSAdamW
from .schedule import EXPLOIT, EXPLORE

METHODS = ("adamw", "dps", "dps-mix", "childtuning-f", "childtuning-d", "mixout")


class ChildTuningAdamW(DPSAdamW):
    """ChildTuning-F (mode="F") or -D (mode="D") as a DPSAdamW whose every step exploits.

    keep_fraction: q, the fraction of each managed tensor updated at a step (F) or
        overall (D). Other arguments as DPSAdamW (no sparsity, stage_steps,
        variant: those are fixed here). For mode="D" call set_masks(...)
        (e.g. with fisher_masks) before the first step; tensors without a
        mask are updated densely.
    """

    def __init__(self, params, mode, keep_fraction=0.3, **kwargs):
        if mode not in ("F", "D"):
            raise ValueError(f"mode must be 'F' or 'D'; got {mode!r}")
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be a number in (0, 1]; got {keep_fraction!r}")
        self.mode, self.keep_fraction = mode, keep_fraction
        super().__init__(params, sparsity=1 - keep_fraction, stage_steps=1, variant="dense", **kwargs)

    def schedule_phase(self, group, step):
        return EXPLOIT

    def make_masks(self, group, params, stage):
        if self.mode == "D":  # fixed masks, set by set_masks (stage_mask below)
            return
        for param in params:  # stage == step: one fresh draw per step, shared by clip_grad_norm_ and step
            state = self.state[param]
            if state.get("mask_stage") != stage:
                keep = torch.rand(param.shape, device=param.device) < self.keep_fraction
                state["mask"] = selection.pack_mask(keep)
                state["mask_stage"] = stage

    def stage_mask(self, param, stage):
        if self.mode == "D":  # the fixed mask is every stage's
            return self.state[param].get("mask")
        return super().stage_mask(param, stage)

    def gradient_factor(self, group):
        return 1 / self.keep_fraction if self.mode == "F" and group["dps"] else None

    def set_masks(self, masks):
        """Fix the mask of each managed param: `masks` maps param -> bool tensor."""
        for param, mask in masks.items():
            group = self.group_of(param)
            if not group["dps"]:
                raise ValueError("set_masks: a param that is not managed (its group has dps=False)")
            if mask.shape != param.shape or mask.dtype != torch.bool:
                raise ValueError(f"set_masks: mask must be a bool tensor of shape {tuple(param.shape)}")
            self.state[param]["mask"] = selection.pack_mask(mask.to(param.device))


class MixoutAdamW(DPSAdamW):
    """Mixout as DPS-Mix exploration at every step: each managed nn.Linear
    tensor is mixed toward its pre-trained value with probability mix_prob.
    Call attach_mix(model) before training, as for DPS-Mix."""

    def __init__(self, params, mix_prob=0.3, **kwargs):
        super().__init__(params, sparsity=mix_prob, stage_steps=1, variant="mix", **kwargs)

    def schedule_phase(self, group, step):
        return EXPLORE


@torch.enable_grad()
def fisher_masks(params, loss_batches, keep_fraction=0.3, max_grad_norm=1.0):
    """ChildTuning-D's masks: for each param, the mean over `loss_batches`
    (callables returning a loss; one pass over the training data) of its
    squared gradient, each tensor's gradient clipped to `max_grad_norm` first
    as published; one threshold over all params keeps the top `keep_fraction`
    fraction (ties at the threshold kept). Returns {param: bool mask}."""
    params = list(params)
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    for loss_of in loss_batches:
        for p in params:
            p.grad = None
        loss_of().backward()
        for p, f in zip(params, fisher):
            if p.grad is not None:
                torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
                f.addcmul_(p.grad.float(), p.grad.float())
        count += 1
    for p in params:
        p.grad = None
    if count == 0:
        raise ValueError("fisher_masks needs at least one batch")
    flat = torch.cat([f.reshape(-1) for f in fisher])  # the /count of the mean does not change the ranking
    key = selection.threshold_key(flat, 1 - keep_fraction)
    return {p: selection.order_keys(f) >= key for p, f in zip(params, fisher)}


def childtuning_groups(model, weight_decay=0.01):
    """param_groups(model) with only encoder tensors managed: managed weights
    whose parameter name lacks "layer" (pooler, classifier) become plain groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in param_groups(model, weight_decay):
        if group.get("dps", True):
            encoder = [p for p in group["params"] if "layer" in names[id(p)]]
            head = [p for p in group["params"] if "layer" not in names[id(p)]]
            groups += [{**group, "params": encoder}, {**group, "params": head, "dps": False}]
        else:
            groups.append(group)
    return [g for g in groups if g["params"]]


def build_optimizer(method, model, total_steps, lr, weight_decay=0.01, sparsity=0.3, stage_ratio=0.05,
                    keep_fraction=0.3, fisher_batches=None, max_grad_norm=1.0, backend="auto", state_dtype="fp32",
                    rounding="nearest"):
    """The optimizer of `method` for `model` and the clip function its loop
    calls between backward and step: returns (optimizer, clip(max_norm)).

    fisher_batches: for "childtuning-d", the loss callables of fisher_masks.
    backend: DPSAdamW's backend (every method but "adamw", which is torch.optim.AdamW).
    state_dtype, rounding: DPSAdamW's storage (dps_fast.state_format). For a model not in
    fp32, or with anything but ("fp32", "nearest"), "adamw" is DPSAdamW with every group
    plain (AdamW's update with that storage), so that AdamW and DPS store alike.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")

    def clip_raw(max_norm):
        return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)

    storage = dict(backend=backend, state_dtype=state_dtype, rounding=rounding)
    if method == "adamw":
        fp32 = all(p.dtype == torch.float32 for p in model.parameters())
        if fp32 and (state_dtype, rounding) == ("fp32", "nearest"):  # torch's AdamW: bf16 moments for bf16
            return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr), clip_raw
        groups = [dict(g, dps=False) for g in param_groups(model, weight_decay)]
        return DPSAdamW(groups, lr=lr, **storage), clip_raw
    if method in ("dps", "dps-mix"):
        opt = DPSAdamW(param_groups(model, weight_decay), lr=lr, sparsity=sparsity, total_steps=total_steps,
                       stage_ratio=stage_ratio, variant="mix" if method == "dps-mix" else "dense", **storage)
    elif method == "mixout":
        opt = MixoutAdamW(param_groups(model, weight_decay), lr=lr, mix_prob=sparsity, **storage)
    else:
        groups = childtuning_groups(model, weight_decay)
        opt = ChildTuningAdamW(groups, mode=method[-1].upper(), keep_fraction=keep_fraction, lr=lr, **storage)
        if method == "childtuning-d":
            if fisher_batches is None:
                raise ValueError("childtuning-d needs fisher_batches (one pass over the training data)")
            managed = [p for g in opt.param_groups if g["dps"] for p in g["params"]]
            opt.set_masks(fisher_masks(managed, fisher_batches, keep_fraction, max_grad_norm))
            model.zero_grad(set_to_none=True)  # the pass left gradients on the unmanaged params too
        return opt, clip_raw
    if method in ("dps-mix", "mixout"):
        opt.attach_mix(model)
    return opt, opt.clip_grad_norm_
