"""DPSAdamW in a Hugging Face `transformers.Trainer`.

    from dps_fast.integrations.hf import DPSTrainer

    trainer = DPSTrainer(model=model, args=args, train_dataset=data,
                         dps_kwargs=dict(sparsity=0.3, stage_ratio=0.05))
    trainer.train()

DPSTrainer is a Trainer whose optimizer is DPSAdamW over
`dps_fast.param_groups(model, args.weight_decay)` (lr, betas, eps from the
TrainingArguments; everything else from `dps_kwargs`), with

- the stage length from the Trainer's own count of optimizer steps:
  T = int(stage_ratio * max_steps), where max_steps is `args.max_steps` or
  epochs x update steps per epoch (gradient accumulation included), the
  number the Trainer's scheduler also uses. The scheduler stays the
  Trainer's (`lr_scheduler_type`, warmup);
- clipping in the published order: the Trainer would clip the unmasked
  gradients (`max_grad_norm`); DPSTrainer sets its copy of the arguments to
  max_grad_norm=0 and clips the gradients step() applies (masked in
  exploitation stages) to the same norm with `opt.clip_grad_norm_`, from a
  callback's `on_pre_optimizer_step` (MaskedClipCallback);
- for variant="mix", the model attached for DPS-Mix mixing while train()
  runs (detached when it ends, however it ends: a later trainer, or a plain
  loop, then trains the model as it is).

Mixed precision. bf16 needs nothing. With fp16, accelerate wraps the
optimizer in an AcceleratedOptimizer holding a GradScaler: the gradients are
still loss-scaled when backward ends, and `AcceleratedOptimizer.step` runs
`scaler.step(opt)`, which hands DPSAdamW the scale and found_inf (it unscales
in its kernels unless already done for this step, and skips the update on
inf/nan without a host sync: dps_fast.amp), and then `scaler.update()`. The clip must see
unscaled gradients, so MaskedClipCallback unscales first unless the Trainer
already did (transformers 5 unscales in its gradient-norm logging even with
max_grad_norm=0; 4.x does not): a second `unscale_` in one step is an error
in torch, so it checks the scaler's per-optimizer stage. `scaler.step` then
finds the gradients unscaled and leaves them alone, so the pending clip
still applies; a skipped step changes nothing in DPSAdamW (no step count,
no score), and the pending clip is replaced at the next step. As step() is
always called, accelerate reports no skipped step, so the Trainer's LR
scheduler also advances on overflow steps (as with torch's fused AdamW).

To build the optimizer yourself and pass `optimizers=(opt, scheduler)` to a
plain Trainer instead, use create_dps_optimizer with the Trainer's step
count, set max_grad_norm=0 and add MaskedClipCallback(1.0).
"""
import copy

from transformers import Trainer, TrainerCallback

from .. import mix
from ..amp import unscale_once
from ..groups import param_groups
from ..optimizer import DPSAdamW


# args.optim values that mean plain AdamW, which DPSTrainer replaces by DPSAdamW; any other
# optimizer choice (adafactor, 8-bit, ...) is refused rather than silently ignored
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")


def create_dps_optimizer(model, args, num_training_steps, **dps_kwargs):
    """DPSAdamW for `model` with the TrainingArguments' lr, betas, eps and weight
    decay and T = int(stage_ratio * num_training_steps), unless dps_kwargs give
    stage_steps; `dps_kwargs` go to DPSAdamW (sparsity, stage_steps or
    stage_ratio, variant, masked, backend). A variant="mix" optimizer is
    attached to `model`: call its detach_mix() when training ends."""
    stage = {} if "stage_steps" in dps_kwargs else {"total_steps": num_training_steps}
    optimizer = DPSAdamW(param_groups(model, args.weight_decay), lr=args.learning_rate,
                         betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, **stage, **dps_kwargs)
    if dps_kwargs.get("variant") == "mix":
        optimizer.attach_mix(model)
    return optimizer


def _dps_of(optimizer):
    """The DPSAdamW inside `optimizer`, or None (no optimizer yet, or another one)."""
    try:
        return None if optimizer is None else unwrap_optimizer(optimizer)[0]
    except TypeError:
        return None


def unwrap_optimizer(optimizer):
    """(the DPSAdamW inside accelerate/Trainer wrappers, the GradScaler of a wrapper or None)."""
    scaler = None
    while not isinstance(optimizer, DPSAdamW):
        if not hasattr(optimizer, "optimizer"):
            raise TypeError(f"expected a DPSAdamW (possibly wrapped by accelerate); got {type(optimizer).__name__}")
        scaler = scaler or getattr(optimizer, "scaler", None)
        optimizer = optimizer.optimizer
    return optimizer, scaler


class MaskedClipCallback(TrainerCallback):
    """Clip the gradients DPSAdamW's next step applies to `max_norm`, as the
    published code does (mask, then clip). Use with max_grad_norm=0."""

    def __init__(self, max_norm=1.0):
        self.max_norm = max_norm

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise RuntimeError("MaskedClipCallback with max_grad_norm > 0 would clip twice, the first time "
                               "unmasked; set max_grad_norm=0 (DPSTrainer does)")
        dps, scaler = unwrap_optimizer(optimizer)
        if scaler is not None and scaler.is_enabled():
            unscale_once(scaler, dps)
        dps.clip_grad_norm_(self.max_norm)


class DPSTrainer(Trainer):
    """transformers.Trainer fine-tuning with DPSAdamW (see the module docstring).

    dps_kwargs: DPSAdamW arguments besides lr/betas/eps/weight_decay, e.g.
        dict(sparsity=0.3, stage_ratio=0.05, variant="dense", masked="grad").
    Everything else as Trainer. The arguments object is copied, not changed.
    """

    def __init__(self, *args, dps_kwargs=None, **kwargs):
        super().__init__(*args, **kwargs)
        optim = getattr(self.args.optim, "value", self.args.optim)
        if optim not in ADAMW_OPTIMS and kwargs.get("optimizers", (None, None))[0] is None:
            raise ValueError(f"DPSTrainer trains with DPSAdamW, so TrainingArguments(optim={optim!r}) would be "
                             f"ignored: leave optim at an AdamW value ({', '.join(ADAMW_OPTIMS)}), or use a plain "
                             "Trainer for another optimizer")
        self.dps_kwargs = dict(dps_kwargs or {})
        self._dps_num_training_steps = None
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            clip = self.args.max_grad_norm
            self.args = copy.copy(self.args)
            self.args.max_grad_norm = 0.0
            self.add_callback(MaskedClipCallback(clip))

    def train(self, *args, **kwargs):
        """Trainer.train; a DPS-Mix model is mixed only while it runs (attached by
        create_optimizer the first time, again by a later train(), removed at the end)."""
        before = _dps_of(self.optimizer)
        if before is not None and any(mix.is_mixed(g) for g in before.param_groups) \
                and not mix.mixes(before, self.model):
            before.attach_mix(self.model)
        try:
            return super().train(*args, **kwargs)
        finally:  # the optimizer it started with and the one it ended with (model_init makes a new one)
            for optimizer in {id(o): o for o in (before, _dps_of(self.optimizer)) if o is not None}.values():
                optimizer.detach_mix()

    @property
    def dps_optimizer(self):
        """The DPSAdamW (None before training creates it)."""
        return None if self.optimizer is None else unwrap_optimizer(self.optimizer)[0]

    def create_optimizer_and_scheduler(self, num_training_steps):
        # transformers 4.x creates the optimizer here, before TrainerState knows max_steps
        self._dps_num_training_steps = num_training_steps
        return super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            steps = self._dps_num_training_steps or self.state.max_steps
            if not steps or steps < 1:
                raise RuntimeError("DPSTrainer: the Trainer's number of optimizer steps is not known yet")
            self.optimizer = create_dps_optimizer(self.model if model is None else model, self.args, steps,
                                                  **self.dps_kwargs)
        return self.optimizer
