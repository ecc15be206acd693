"""What the compiled backends (cpu.py, cuda.py) share: loading a compiled
module, and turning a backend call into the raw addresses and sizes the
kernels take (csrc/dps_table.h describes the other side).

Every call is first checked by dps_fast.param_state (a tensor that does not fit its
parameter is a ValueError, never a kernel argument); tensors that fit but
that the kernels cannot take (non-contiguous, float64, ...) go through the
reference backend instead, so every call gives the reference's result.
"""
import importlib
import importlib.machinery
import importlib.util
import operator

import torch

from .. import param_state, selection
from .. import rounding as rounding_bits
from .. import state_format as formats
from . import contract, reference

DTYPE_CODES = contract.TORCH_DTYPES  # the parameter dtypes the kernels take

_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_contiguous = torch.Tensor.is_contiguous
_dtype = operator.attrgetter("dtype")


def load(module_name, path=None):
    """(module, None) or (None, why it cannot be imported). `path`: load the module
    from that file instead (e.g. a sanitizer build: `make sanitize`)."""
    try:
        if path:
            loader = importlib.machinery.ExtensionFileLoader(module_name, path)
            module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader))
            loader.exec_module(module)
            return module, None
        return importlib.import_module(module_name), None
    except ImportError as error:
        return None, (f"the compiled module {module_name} is not built ({error}); reinstall with a C++ "
                      "toolchain and cmake (see `dps-fast info`)")


def _split(params, grads, state_lists):
    """{dtype: indices} of the tensors the kernels take (None: all of them, the
    usual case, found with a few C-level passes), and the indices they do not:
    a parameter of another dtype (float64, whose state is float64 in every
    format), a gradient of another dtype than its parameter, or any tensor of
    the entry (param, grad, moments, score, mask) that is not contiguous.
    dps_fast.param_state.check_update has checked the shapes and dtypes."""
    dtypes = list(map(_dtype, params))
    first = dtypes[0]
    if (first in DTYPE_CODES and dtypes.count(first) == len(dtypes) and list(map(_dtype, grads)) == dtypes
            and all(all(map(_contiguous, tensors)) for tensors in (params, grads, *state_lists))):
        return {first: None}, []
    by_dtype, others = {}, []
    for i, (param, grad) in enumerate(zip(params, grads)):
        if (param.dtype in DTYPE_CODES and grad.dtype == param.dtype
                and all(tensors[i].is_contiguous() for tensors in (params, grads, *state_lists))):
            by_dtype.setdefault(param.dtype, []).append(i)
        else:
            others.append(i)
    return by_dtype, others


def _scalar(value, device):
    """A 0-dim fp32 tensor on `device` (or None), for a kernel to read."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(float(value))
    return value.to(device=device, dtype=torch.float32).reshape(())


def update_function(place):
    """A compiled backend's update, with the contract's signature (contract.Backend.update):
    reference.update's result, run by the kernels where they take the tensors.
    `place(params)` is (launch, device) for the call: the scalars go to `device`, and
    launch(mode, dtype, storage, lists, hyper, scalars) runs once per dtype, `storage`
    being (state format code, stochastic parameter stores) and `lists` the kernels'
    per-tensor lists (addresses, sizes, steps, and the random bits' keys and offsets)."""
    def update(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
               grad_coef=None, scores=None, reset_scores=None, masks=None, freeze=False,
               inv_scale=None, found_inf=None, state_format="fp32", rounding="nearest", seeds=None, offsets=None,
               exp_avg_scales=None, exp_avg_sq_scales=None):
        """reference.update's contract (dps_fast.backends.contract.Backend.update), for the state
        formats the kernels store (param_state.check_update refuses the others: no scales here)."""
        if not params:
            return
        launch, device = place(params)
        param_state.check_update(params, grads, exp_avgs, exp_avg_sqs, scores, masks, device=device,
                                 state_format=state_format)
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                     state_format=state_format, rounding=rounding)
        kernel_hyper = dict(lr=float(lr), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)  # lr's value
        scalars = [_scalar(value, device) for value in (grad_coef, inv_scale, found_inf)]
        mode = contract.mode_of(scores, masks, freeze)
        state_lists = [exp_avgs, exp_avg_sqs] + [t for t in (scores, masks) if t is not None]
        format = formats.of(state_format)
        by_dtype, others = _split(params, grads, state_lists)
        for dtype, indices in by_dtype.items():
            if indices is None:
                pick = lambda values: values  # noqa: E731
            else:
                pick = lambda values: [values[i] for i in indices]  # noqa: E731
            keys, picked_offsets = [[], []], []
            if formats.needs_random_bits(format, rounding, params[0 if indices is None else indices[0]]):
                picked_seeds = pick(seeds) if seeds is not None else [None]
                if None in picked_seeds:
                    raise ValueError(f"state_format={state_format!r}, rounding={rounding!r}: every tensor needs its "
                                     "seed")
                streams = [rounding_bits.stream_keys(seed, step) for seed, step in zip(picked_seeds, pick(steps))]
                keys = [[key[0] for key in streams], [key[1] for key in streams]]
                picked_offsets = pick(offsets) if offsets is not None else [0] * len(streams)
            lists = [list(map(_data_ptr, pick(params))), list(map(_data_ptr, pick(grads))),
                     list(map(_data_ptr, pick(exp_avgs))), list(map(_data_ptr, pick(exp_avg_sqs))),
                     list(map(_data_ptr, pick(scores))) if scores is not None else [],
                     list(map(_data_ptr, pick(masks))) if masks is not None and scores is None else [],
                     list(map(_numel, pick(params))), pick(steps),
                     pick(reset_scores) if scores is not None else [], *keys, picked_offsets]
            addresses = [0 if scalar is None else scalar.data_ptr() for scalar in scalars]
            launch(int(mode), int(DTYPE_CODES[dtype]), (format.code, rounding == "stochastic"), lists, kernel_hyper,
                   addresses)
        if others:
            reference.update_some(others, params, grads, exp_avgs, exp_avg_sqs, steps, **hyper, grad_coef=grad_coef,
                                  scores=scores, reset_scores=reset_scores, masks=masks, freeze=freeze,
                                  inv_scale=inv_scale, found_inf=found_inf, seeds=seeds, offsets=offsets)
    return update


def masked_norms(launch, grads, masks, device):
    """reference.masked_norms's result, the contiguous grads of kernel dtypes computed
    by launch(dtype_code, grad_addresses, mask_addresses, numels) -> squared norms
    (a list, or an fp64 tensor on the grads' device); the kernels run on `device`."""
    param_state.check_masks(grads, masks, device)
    norms = [None] * len(grads)
    by_dtype = {}
    for i, grad in enumerate(grads):
        if grad.dtype in DTYPE_CODES and grad.is_contiguous() and masks[i].is_contiguous():
            by_dtype.setdefault(grad.dtype, []).append(i)
        else:
            norms[i] = reference.masked_norms([grad], [masks[i]])[0]
    for dtype, indices in by_dtype.items():
        squares = launch(int(DTYPE_CODES[dtype]), [grads[i].data_ptr() for i in indices],
                         [masks[i].data_ptr() for i in indices], [grads[i].numel() for i in indices])
        for i, norm in zip(indices, reference.norms_from_squares(torch.as_tensor(squares, dtype=torch.float64), dtype)):
            norms[i] = norm
    return torch.stack(norms)


def select_masks(launch, scores, sparsity, device):
    """Packed masks of `scores` (see dps_fast.selection), computed by
    launch(score_addresses, mask_addresses, numels, ks) over fp32 contiguous scores
    on `device`, the one the kernels run on (bf16 scores converted a batch at a time:
    selection.batches)."""
    param_state.check_device(scores, device, "scores")
    masks = [torch.empty(selection.packed_size(score.numel()), dtype=torch.uint8, device=score.device)
             for score in scores]
    for batch in selection.batches(scores):
        ready = [scores[i].to(torch.float32).contiguous() for i in batch]  # no copy when already so
        numels = list(map(_numel, ready))
        launch(list(map(_data_ptr, ready)), [masks[i].data_ptr() for i in batch], numels,
               [selection.kept_count(n, sparsity) for n in numels])
    return masks
