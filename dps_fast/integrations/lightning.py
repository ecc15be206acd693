"""DPSAdamW in a PyTorch Lightning `LightningModule`.

    import lightning as L
    from dps_fast.integrations.lightning import DPSLightningModule, create_dps_optimizer

    class Model(DPSLightningModule, L.LightningModule):   # the mixin first
        ...
        def configure_optimizers(self):
            return create_dps_optimizer(self, lr=2e-5, weight_decay=0.01, sparsity=0.3, stage_ratio=0.05)

    L.Trainer(gradient_clip_val=1.0, precision="bf16-mixed").fit(Model(), data)

Two things differ from a plain AdamW in Lightning, and this module does both.

- The stage length. `create_dps_optimizer` builds DPSAdamW over
  `dps_fast.param_groups(module, weight_decay)` with
  T = int(stage_ratio * trainer.estimated_stepping_batches): the Trainer's own
  count of optimizer steps (epochs x batches, `accumulate_grad_batches` and
  `max_steps` included), the number an LR schedule over the run also uses.
  Call it from `configure_optimizers`, where the Trainer is attached; give
  `stage_steps=` (or `total_steps=`) to set T yourself. A variant="mix"
  optimizer is attached to the module for DPS-Mix mixing; the mixin's
  `on_fit_end` detaches it, so that after `fit` the module computes with its
  own weights in training mode too. (Lightning calls no module hook when
  `fit` raises: the mixing then stays until `opt.detach_mix()` or the next
  create_dps_optimizer, which removes any mixing left on the model; without
  the mixin, call `opt.detach_mix()` yourself.)
- Gradient clipping. Lightning clips with `torch.nn.utils.clip_grad_norm_`,
  which sees the unmasked gradients in exploitation stages: at precision
  32 it silently clips the wrong norm, and under "bf16-mixed"/"16-mixed" it
  refuses DPSAdamW with any `gradient_clip_val` ("... performs unscaling of
  gradients internally ... 'fused' optimizer?"), because DPSAdamW sets
  torch's `_step_supports_amp_scaling` (dps_fast.amp), even though bf16 has
  no scaler. The mixin's `configure_gradient_clipping` clips what DPSAdamW's
  next step applies (masked in exploitation stages: the published order)
  with `DPSAdamW.clip_grad_norm_`, at the Trainer's `gradient_clip_val`.

Mixed precision. "bf16-mixed" has no GradScaler: nothing to unscale.
"16-mixed" has one (Lightning's MixedPrecision plugin; on the CPU Lightning
turns precision="16-mixed" into "bf16-mixed", pass
`plugins=[MixedPrecision("16-mixed", "cpu")]` to keep fp16). Lightning
unscales before clipping only for optimizers without
`_step_supports_amp_scaling`, so for DPSAdamW the gradients are still
loss-scaled when `configure_gradient_clipping` runs: `clip_gradients` unscales
them first (once per step: a second `unscale_` is an error in torch), and
`scaler.step(opt)` then hands DPSAdamW found_inf without a scale. Without a
clip nothing is unscaled on the host: DPSAdamW unscales in its kernels.
A step GradScaler skips (inf/nan) changes nothing in DPSAdamW, not even its
step count. Hooks that run before the clip (`on_before_optimizer_step`) see
loss-scaled gradients under "16-mixed", as with torch's fused AdamW.

Checkpoints. Lightning saves `optimizer.state_dict()` (DPS step count,
moments, scores, masks) and the GradScaler's state, and restores both on
`fit(ckpt_path=...)`: a run resumed from an end-of-epoch checkpoint continues
the DPS schedule exactly (tested to the bit in 32, bf16-mixed and 16-mixed
precision). Lightning does not restore the RNG state, so DPS-Mix (random
Mixout draws) resumes with other draws unless you restore it yourself.

Manual optimization: call `clip_gradients(self, opt, max_norm)` between
`self.manual_backward(loss)` and `opt.step()`. `opt.clip_grad_norm_` on the
LightningOptimizer that `self.optimizers()` returns clips the same way at
"32-true" and "bf16-mixed" (the wrapper shares DPSAdamW's pending clip), but
under "16-mixed" it would see loss-scaled gradients: `clip_gradients`
unscales them first.

Not covered: DeepSpeed and FSDP1 strategies flatten parameters (not
supported by DPSAdamW, see the README).
"""
import math
import warnings

import torch

from .. import mix
from ..amp import unscale_once
from ..groups import param_groups
from ..optimizer import DPSAdamW


def _dps_of(optimizer):
    """The DPSAdamW inside `optimizer` (a LightningOptimizer, or a wrapper with
    .optimizer), or None if there is none. A LightningOptimizer passes
    isinstance checks (its class subclasses the wrapped optimizer's) and
    forwards reads of attributes it lacks, but keeps what is set on it: a
    clip set through it (opt.clip_grad_norm_) would never reach the real
    optimizer's step."""
    for _ in range(8):
        inner = getattr(optimizer, "_optimizer", None)  # LightningOptimizer
        if inner is None and not isinstance(optimizer, DPSAdamW):
            inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, DPSAdamW) else None


def estimated_steps(module):
    """The number of optimizer steps the module's Trainer will take
    (`trainer.estimated_stepping_batches`), as an int; RuntimeError without a
    Trainer, ValueError when the run has no known length."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        raise RuntimeError("create_dps_optimizer: the module is not attached to a Trainer; call it from "
                           "configure_optimizers, or give stage_steps= (or total_steps=)")
    steps = trainer.estimated_stepping_batches
    if not isinstance(steps, (int, float)) or math.isinf(steps) or steps < 1:
        raise ValueError(f"create_dps_optimizer: the Trainer's number of optimizer steps is not known "
                         f"(estimated_stepping_batches={steps}: max_epochs=-1 or an iterable dataset without "
                         "max_steps); set max_steps or max_epochs, or give stage_steps=")
    return int(steps)


def _warn_if_clipped_unmasked(module):
    """Warn when the module's Trainer would clip with Lightning's own clipping (not the mixin's)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not (getattr(trainer, "gradient_clip_val", None) or 0) > 0:
        return
    if not getattr(module, "automatic_optimization", True):
        return  # Lightning refuses gradient_clip_val with manual optimization
    hook = getattr(type(module), "configure_gradient_clipping", None)
    if getattr(hook, "__qualname__", "") == "LightningModule.configure_gradient_clipping":
        warnings.warn(f"{type(module).__name__} uses Lightning's configure_gradient_clipping: at "
                      f"gradient_clip_val={trainer.gradient_clip_val} it would clip the unmasked gradients with "
                      "torch.nn.utils.clip_grad_norm_ (and refuses DPSAdamW under mixed precision); put "
                      "DPSLightningModule before LightningModule in its bases to clip what DPSAdamW applies",
                      stacklevel=3)


def create_dps_optimizer(module, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, *, model=None,
                         **dps_kwargs):
    """DPSAdamW over `param_groups(model or module, weight_decay)` with
    T = int(stage_ratio * trainer.estimated_stepping_batches), unless
    `dps_kwargs` give stage_steps or total_steps. Other `dps_kwargs` go to
    DPSAdamW (sparsity, stage_ratio, variant, masked, backend, ...). For
    variant="mix" the model is attached for mixing (any earlier mixing of it, e.g.
    from a fit that raised before the mixin's on_fit_end, is removed first)."""
    model = module if model is None else model
    _warn_if_clipped_unmasked(module)
    if dps_kwargs.get("stage_steps") is None and dps_kwargs.get("total_steps") is None:
        dps_kwargs.pop("stage_steps", None)
        dps_kwargs["total_steps"] = estimated_steps(module)
    optimizer = DPSAdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **dps_kwargs)
    if dps_kwargs.get("variant") == "mix":
        mix.detach(model)
        optimizer.attach_mix(model)
    return optimizer


def _algorithm(module, gradient_clip_algorithm):
    if gradient_clip_algorithm is None:
        gradient_clip_algorithm = getattr(module.trainer, "gradient_clip_algorithm", None) or "norm"
    name = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)).lower()
    if name not in ("norm", "value"):
        raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value'; got {gradient_clip_algorithm!r}")
    return name


def clip_gradients(module, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
    """Clip the gradients of `optimizer` (a DPSAdamW, possibly wrapped in a
    LightningOptimizer) for `module`'s Trainer; the defaults are the Trainer's
    `gradient_clip_val` and `gradient_clip_algorithm`.

    "norm": DPSAdamW.clip_grad_norm_, the 2-norm of what the next step applies
    (masked in exploitation stages); returns that norm before clipping.
    "value": torch.nn.utils.clip_grad_value_ on the gradients (element-wise,
    so it commutes with the mask; exploration scores then see clipped
    gradients). Under a GradScaler the gradients are unscaled first (once per
    step). Returns None when there is nothing to clip."""
    dps = _dps_of(optimizer)
    if dps is None:
        raise TypeError(f"clip_gradients: expected a DPSAdamW (possibly in a LightningOptimizer); "
                        f"got {type(optimizer).__name__}")
    if gradient_clip_val is None:
        gradient_clip_val = getattr(module.trainer, "gradient_clip_val", None) or 0.0
    if not isinstance(gradient_clip_val, (int, float)) or isinstance(gradient_clip_val, bool):
        raise TypeError(f"gradient_clip_val must be an int or a float; got {gradient_clip_val!r}")
    algorithm = _algorithm(module, gradient_clip_algorithm)
    if gradient_clip_val <= 0:
        return None
    scaler = getattr(getattr(module.trainer, "precision_plugin", None), "scaler", None)
    if scaler is not None and scaler.is_enabled():
        unscale_once(scaler, dps)
    if algorithm == "value":
        grads = [p for group in dps.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_value_(grads, gradient_clip_val)
        return None
    return dps.clip_grad_norm_(gradient_clip_val)


class DPSLightningModule:
    """Mixin for a LightningModule trained with DPSAdamW: put it before
    LightningModule in the bases,

        class Model(DPSLightningModule, L.LightningModule): ...

    Its `configure_gradient_clipping` clips a DPSAdamW's gradients with
    `clip_gradients` (the masked norm, unscaled under "16-mixed") at the
    Trainer's `gradient_clip_val`, and returns what it returns (Lightning
    ignores it); other optimizers get Lightning's own clipping. Override it and
    call `clip_gradients(self, optimizer, ...)` for other limits. Its `on_fit_end`
    removes the DPS-Mix mixing of the fit's DPSAdamW (call super() if you override it)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for klass in cls.__mro__:
            if klass is DPSLightningModule:
                break
            if klass.__name__ == "LightningModule" and klass.__module__.split(".")[0] in ("lightning",
                                                                                          "pytorch_lightning"):
                raise TypeError(f"{cls.__name__}: put DPSLightningModule before LightningModule in the bases "
                                "(class Model(DPSLightningModule, L.LightningModule)), or Lightning's "
                                "configure_gradient_clipping wins")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if _dps_of(optimizer) is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        return clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # the norm, or None

    def on_fit_end(self):
        for optimizer in self.trainer.optimizers:
            dps = _dps_of(optimizer)
            if dps is not None:
                dps.detach_mix()
        super().on_fit_end()
