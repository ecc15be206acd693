"""Compiled CPU backend: one OpenMP pass over chunks of all tensors per step
(csrc/cpu), hot loops built for AVX-512, AVX2 and baseline x86-64 and picked
for the CPU at run time; selection by parallel radix select (no sort).

Read at import, for tests: DPS_FAST_CPU_ISA=avx512|avx2|base forces the
kernels of one instruction set (e.g. the baseline build on an AVX-512
machine); DPS_FAST_CPU_KERNELS=FILE loads the compiled module from FILE (the
AddressSanitizer build of `make sanitize`).

Same contract and results as the reference backend (reference.py)."""
import os

import torch

from . import _compiled

NAME = "cpu"

_kernels, _import_error = _compiled.load("dps_fast._cpu_kernels", os.environ.get("DPS_FAST_CPU_KERNELS"))
if _kernels is not None and os.environ.get("DPS_FAST_CPU_ISA"):
    try:
        _kernels.set_isa(os.environ["DPS_FAST_CPU_ISA"])
    except ValueError as error:  # a typo must not quietly test the default kernels
        raise ValueError(f"DPS_FAST_CPU_ISA={os.environ['DPS_FAST_CPU_ISA']!r}: {error}; this CPU runs "
                         f"{', '.join(_kernels.runnable_isas())}") from None


def unavailable_reason(device: torch.device):
    """None on CPU tensors when the compiled module is built."""
    if _kernels is None:
        return _import_error
    if torch.device(device).type != "cpu":
        return f"the cpu backend updates CPU tensors only, not {torch.device(device).type} tensors"
    return None


def _module():
    if _kernels is None:
        raise RuntimeError(f"backend 'cpu' cannot run: {_import_error}")
    return _kernels


def _launch_update(mode, dtype, storage, lists, hyper, scalars):
    _module().update(mode, dtype, *storage, *lists, hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"],
                     hyper["weight_decay"], *scalars, torch.get_num_threads())


def _place_update(params):
    return _launch_update, torch.device("cpu")


update = _compiled.update_function(_place_update)  # reference.update's contract, on CPU tensors


def _launch_masked_norms(dtype, grads, masks, numels):
    return _module().masked_sq_norms(dtype, grads, masks, numels, torch.get_num_threads())


def masked_norms(grads, masks):
    """reference.masked_norms's contract on CPU tensors: one pass over each
    gradient and its mask bits (no unpacked mask, no masked copy)."""
    return _compiled.masked_norms(_launch_masked_norms, grads, masks, torch.device("cpu"))


def _launch_select(scores, masks, numels, ks):
    _module().select(scores, masks, numels, ks, torch.get_num_threads())


def select_masks(scores, sparsity):
    """One packed mask per score tensor (see dps_fast.selection)."""
    return _compiled.select_masks(_launch_select, scores, sparsity, torch.device("cpu"))
