"""Triton backend: the DPS update, the per-tensor selection and the masked
norms as Triton kernels, one module per job (update_kernels, select_kernels,
norm_kernels), with what they share in tables (its notes explain the
launches). Same contract and semantics as reference.py (the executable spec).

On a GPU the kernels are compiled; on CPU tensors they run only through
Triton's interpreter, a test tool (tables.py, Note [interpreter]).
"""
import torch

from .norm_kernels import masked_norms
from .select_kernels import select_masks
from .tables import INTERPRETED
from .update_kernels import update

NAME = "triton"
__all__ = ["NAME", "unavailable_reason", "update", "select_masks", "masked_norms"]  # the backend contract


def unavailable_reason(device: torch.device):
    """None on CUDA devices (and on the CPU under TRITON_INTERPRET=1), else why not."""
    if device.type == "cuda":
        if INTERPRETED:
            return ("TRITON_INTERPRET=1 was set when the Triton kernels were defined; the interpreter "
                    "runs on CPU tensors only")
        if not torch.cuda.is_available():
            return "this torch sees no CUDA device"
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return None
        return ("Triton kernels need a GPU; on CPU tensors they run only through Triton's interpreter "
                "(a test tool: set TRITON_INTERPRET=1 before dps_fast.backends.triton_backend is imported)")
    return f"Triton kernels run on CUDA devices, not on {device.type}"
