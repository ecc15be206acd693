"""Backend registry.

Every backend is a module with the same small contract (see reference.py):
    NAME                          the name users pass as backend=...
    unavailable_reason(device)    None if it can update tensors on `device`,
                                  else a sentence saying why not
    update(...)                   one fused explore / exploit / plain AdamW pass
    select_masks(scores, sparsity)  per-tensor top-k masks, ties kept, packed
                                  as dps_fast.selection.pack_mask does
    masked_norms(grads, masks)    the L2 norm of each grad * its packed mask
                                  (for DPSAdamW.clip_grad_norm_)
"""
import importlib

import torch

from .. import state_format as formats

# In order of preference for backend="auto" (fastest first); "torch" runs anywhere.
BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")
CHOICES = ("auto",) + BACKEND_NAMES

_MODULES = {"cuda": "cuda", "triton": "triton_backend", "cpu": "cpu", "torch": "reference"}


def _module(name):
    """The backend's module, or a string saying why it cannot be loaded."""
    if name not in _MODULES:
        return f"the {name!r} backend is not part of this version of dps_fast"
    try:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    except ImportError as error:  # a compiled module that was not built
        return f"the {name!r} backend could not be imported ({error})"


def check_name(backend):
    """Raise ValueError unless `backend` is one of CHOICES."""
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, CHOICES))}; got {backend!r}")


def unavailable_reason(name, device):
    """None if backend `name` can run on `device`, else why not."""
    module = _module(name)
    if isinstance(module, str):
        return module
    return module.unavailable_reason(torch.device(device))


def resolve(backend, device, implementation=None, state_format="fp32"):
    """The backend module to use for tensors on `device` whose state is in `state_format`.

    "auto" picks the first of BACKEND_NAMES that can run there, among the
    multi-tensor kernels only for implementation="fused" (torch's fused=True or
    foreach=True), the reference for "unfused" (fused=False or foreach=False),
    and the reference for a state format no kernel stores yet
    (state_format.kernel_refusal; dps_fast.options refuses the other choices);
    a backend that cannot run raises RuntimeError saying why."""
    check_name(backend)
    if backend == "auto" and implementation != "fused" and formats.kernel_refusal(state_format):
        backend = "torch"
    if backend == "auto":
        kernels = tuple(name for name in BACKEND_NAMES if name != "torch")
        names = {"fused": kernels, "unfused": ("torch",), None: BACKEND_NAMES}[implementation]
        for name in names:
            # Triton on the CPU is its interpreter: a test tool, never the fast choice.
            if name == "triton" and torch.device(device).type == "cpu":
                continue
            if unavailable_reason(name, device) is None:
                return _module(name)
        if implementation == "fused":
            reasons = "; ".join(f"{name}: {unavailable_reason(name, device)}" for name in names)
            raise RuntimeError(f"fused=True / foreach=True: no multi-tensor kernel can run on {torch.device(device)} "
                               f"here ({reasons})")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(
            f"backend={backend!r} cannot run on {torch.device(device)} here: {reason}. "
            f"Available: {', '.join(repr(n) for n in available(device))}")
    return _module(backend)


def available(device="cpu"):
    """Names of the backends that can run on `device` here."""
    return [name for name in BACKEND_NAMES if unavailable_reason(name, device) is None]
