"""Compiled CUDA backend (csrc/cuda): one kernel launch per step for every
tensor of a dtype (a chunk table, like torch's fused AdamW), GradScaler's
found_inf and inv_scale read on the device (no host sync), and selection by a
batched radix select over the scores' bit patterns (no sort, no copy).

Same contract and results as the reference backend (reference.py)."""
import torch

from . import _compiled

NAME = "cuda"

_kernels, _import_error = _compiled.load("dps_fast._cuda_kernels")


def unavailable_reason(device: torch.device):
    """None on CUDA tensors when the module is built and reaches a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend updates CUDA tensors only, not {device.type} tensors"
    if _kernels is None:
        return _import_error
    if torch.version.hip:
        return "the compiled module is built for NVIDIA CUDA, and this torch runs on ROCm"
    reason = _kernels.unavailable_reason()
    if reason is not None:
        return f"the compiled CUDA module cannot reach a GPU: {reason}"
    if not torch.cuda.is_available():
        return "torch reports no usable CUDA device"
    return None


def _module():
    if _kernels is None:
        raise RuntimeError(f"backend 'cuda' cannot run: {_import_error}")
    return _kernels


def _place(device):
    """(device index, current stream handle) of a CUDA device."""
    if device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' updates CUDA tensors only; got {device.type} tensors")
    index = torch.cuda.current_device() if device.index is None else device.index
    return index, torch.cuda.current_stream(index).cuda_stream


def _place_update(params):
    device = params[0].device
    index, stream = _place(device)

    def launch(mode, dtype, storage, lists, hyper, scalars):
        _module().update(index, stream, mode, dtype, *storage, *lists, hyper["lr"], hyper["beta1"], hyper["beta2"],
                         hyper["eps"], hyper["weight_decay"], *scalars)

    return launch, device


update = _compiled.update_function(_place_update)  # reference.update's contract, on the CUDA tensors of one device


def select_masks(scores, sparsity):
    """One packed mask per score tensor (see dps_fast.selection)."""
    if not scores:
        return []
    device = scores[0].device
    index, stream = _place(device)

    def launch(score_addresses, mask_addresses, numels, ks):
        _module().select(index, stream, score_addresses, mask_addresses, numels, ks)

    return _compiled.select_masks(launch, scores, sparsity, device)


def masked_norms(grads, masks):
    """reference.masked_norms's contract on the CUDA tensors of one device: one
    pass over each gradient and its mask bits."""
    if not grads:
        return torch.empty(0, dtype=torch.float64)
    device = grads[0].device
    index, stream = _place(device)

    def launch(dtype, grad_addresses, mask_addresses, numels):
        sums = torch.zeros(len(numels), dtype=torch.float64, device=device)
        _module().masked_sq_norms(index, stream, dtype, grad_addresses, mask_addresses, numels, sums.data_ptr())
        return sums

    return _compiled.masked_norms(launch, grads, masks, device)
