"""The DPS step as a function of tensors, as torch.optim.adamw.adamw() is AdamW's.

DPSAdamW (validation, state, schedule) calls `dps_adamw` once per param group
and device with the group's tensors, its hyperparameters and what the step
does (`phase`, and in exploitation the masks); the update itself is one or two
calls of a backend (the contract: dps_fast.backends.contract.Backend).
"""
from typing import List, Optional, Sequence

import torch

from . import distributed
from .schedule import EXPLOIT, EXPLORE

PLAIN = "plain"  # the step of a group not managed by DPS (EXPLORE and EXPLOIT: the schedule's phases)


def dps_adamw(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
              exp_avg_sqs: List[torch.Tensor], steps: Sequence[int], *, backend, phase: str, lr, beta1: float,
              beta2: float, eps: float, weight_decay: float, scores: Optional[List[torch.Tensor]] = None,
              reset_scores: Optional[Sequence[bool]] = None, masks: Optional[List[Optional[torch.Tensor]]] = None,
              freeze: bool = False, grad_coef: Optional[torch.Tensor] = None,
              inv_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
              state_format: str = "fp32", rounding: str = "nearest",
              seeds: Optional[Sequence[Optional[int]]] = None,
              exp_avg_scales: Optional[List[Optional[torch.Tensor]]] = None,
              exp_avg_sq_scales: Optional[List[Optional[torch.Tensor]]] = None) -> None:
    """One AdamW step of tensors on one device, in place, as DPS's `phase` asks:

    - PLAIN: AdamW (a group not managed by DPS);
    - EXPLORE: AdamW, and each score := g*g where reset_scores[i], else += g*g;
    - EXPLOIT: masks[i] (packed, dps_fast.selection) selects the entries updated
      ("grad": the others get a zero gradient; freeze: they are left as they
      are); a tensor whose mask is None (no score from the stage before) is
      updated densely.

    steps: each tensor's bias-correction step, already advanced. lr: a float
    or a 0-dim tensor. grad_coef: a 0-dim factor on the gradient the update
    uses, after scoring (clip, maximize's sign). inv_scale / found_inf: a
    GradScaler's, on the device (dps_fast.amp). state_format, rounding: how the
    state and a bf16/fp16 parameter are stored (dps_fast.state_format); seeds:
    each tensor's stochastic-rounding seed (None where it draws no bits).
    exp_avg_scales / exp_avg_sq_scales: the block scales of 8-bit moments (None
    where the moments are floats; the state entries exp_avg_scale, exp_avg_sq_scale).
    DTensors update their local shards, whose random bits are those of their
    entries' indices in the whole tensor.
    """
    offsets = None
    if any(map(distributed.is_dtensor, params)):  # the one place the update sees DTensors' shards
        offsets = [distributed.global_offset(p) if seed is not None and distributed.is_dtensor(p) else 0
                   for p, seed in zip(params, seeds or [None] * len(params))]
        params, grads, exp_avgs, exp_avg_sqs = map(distributed.local_all, (params, grads, exp_avgs, exp_avg_sqs))
        scores = None if scores is None else distributed.local_all(scores)
    lists = dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps, seeds=seeds,
                 offsets=offsets, exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, grad_coef=grad_coef,
                 inv_scale=inv_scale, found_inf=found_inf, state_format=state_format, rounding=rounding)
    if phase == EXPLORE:
        backend.update(**lists, **hyper, scores=scores, reset_scores=reset_scores)
    elif phase == EXPLOIT:
        masked = [i for i, m in enumerate(masks) if m is not None]
        dense = [i for i, m in enumerate(masks) if m is None]
        if masked:
            backend.update(**_pick(lists, masked), **hyper, masks=[masks[i] for i in masked], freeze=freeze)
        if dense:
            backend.update(**_pick(lists, dense), **hyper)
    elif phase == PLAIN:
        backend.update(**lists, **hyper)
    else:
        raise ValueError(f"phase must be one of {PLAIN!r}, {EXPLORE!r}, {EXPLOIT!r}; got {phase!r}")


def _pick(lists, indices):
    return {name: None if values is None else [values[i] for i in indices] for name, values in lists.items()}
