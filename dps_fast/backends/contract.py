"""The backend contract: what every backend module (reference, cpu, cuda,
triton_backend) provides, as a typed Protocol, and the codes the compiled
kernels share with Python.

A backend is a module; `dps_fast.backends.resolve` picks one per device and
dps_fast.functional calls it. tests/test_backends_contract.py checks that
every backend module has exactly these names with these signatures, and
that the compiled modules' codes equal the enums below (csrc/dps_math.h
defines them for C++, once).
"""
import enum
from typing import List, Optional, Protocol, Sequence

import torch


class Mode(enum.IntEnum):
    """What one update call does to every tensor it is given (csrc/dps_math.h: enum Mode)."""
    PLAIN = 0           # AdamW (groups not managed by DPS)
    EXPLORE = 1         # score := g*g or score += g*g, then AdamW
    EXPLOIT_GRAD = 2    # masked-out entries get a zero gradient, then AdamW
    EXPLOIT_FREEZE = 3  # masked-out entries (value and moments) are left as they are


class DType(enum.IntEnum):
    """Storage dtypes of parameters and gradients the compiled kernels take (enum DType)."""
    FLOAT32 = 0
    BFLOAT16 = 1
    FLOAT16 = 2


TORCH_DTYPES = {torch.float32: DType.FLOAT32, torch.bfloat16: DType.BFLOAT16, torch.float16: DType.FLOAT16}


class StateFormat(enum.IntEnum):
    """How the kernels store exp_avg, exp_avg_sq and scores (dps_fast.state_format's codes)."""
    FP32 = 0
    BF16 = 1  # with stochastic rounding
    EIGHT_BIT = 2  # moments as block-wise 8-bit codes and scales, bf16 scores (no kernel stores it yet)


def mode_of(scores, masks, freeze):
    """The Mode of an update call from the arguments it was given."""
    if scores is not None:
        return Mode.EXPLORE
    if masks is not None:
        return Mode.EXPLOIT_FREEZE if freeze else Mode.EXPLOIT_GRAD
    return Mode.PLAIN


class Backend(Protocol):
    """A backend module. Every function takes tensors of one device."""

    NAME: str  # what users pass as backend=...

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None if it can update tensors on `device`, else a sentence saying why not."""

    def update(self, params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
               exp_avg_sqs: List[torch.Tensor], steps: Sequence[int], *, lr, beta1: float, beta2: float,
               eps: float, weight_decay: float, grad_coef: Optional[torch.Tensor] = None,
               scores: Optional[List[torch.Tensor]] = None, reset_scores: Optional[Sequence[bool]] = None,
               masks: Optional[List[torch.Tensor]] = None, freeze: bool = False,
               inv_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
               state_format: str = "fp32", rounding: str = "nearest", seeds: Optional[Sequence[Optional[int]]] = None,
               offsets: Optional[Sequence[int]] = None, exp_avg_scales: Optional[List[Optional[torch.Tensor]]] = None,
               exp_avg_sq_scales: Optional[List[Optional[torch.Tensor]]] = None) -> None:
        """One fused explore / exploit / plain AdamW pass in place (see reference.update); state_format
        is a name of dps_fast.state_format (its code: StateFormat); the block scales of 8-bit moments
        come as exp_avg_scales / exp_avg_sq_scales (None where the moments are floats)."""

    def select_masks(self, scores: List[torch.Tensor], sparsity: float) -> List[torch.Tensor]:
        """Per-tensor top-k masks, ties kept, packed as dps_fast.selection.pack_mask does."""

    def masked_norms(self, grads: List[torch.Tensor], masks: List[torch.Tensor]) -> torch.Tensor:
        """The L2 norm of each grad * its packed mask, a 1-D float64 tensor (for clip_grad_norm_): squares
        summed in float64, the root rounded to the gradient's dtype (reference.masked_norms)."""


FUNCTIONS = ("unavailable_reason", "update", "select_masks", "masked_norms")
