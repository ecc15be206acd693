"""The per-parameter state of DPSAdamW, and the one check that every tensor a
kernel touches fits its parameter.

State of a parameter `p` (optimizer.state[p]):
    step                      int: AdamW's bias-correction step
    exp_avg, exp_avg_sq       AdamW's moments   } p's shape, in state_dtype(p, its group's
    score                     DPS score (g*g)   }   state_dtype, key): dps_fast.state_format
    exp_avg_scale,            8-bit state only: the moments' fp32 block scales, 1-D, one per
      exp_avg_sq_scale          256 entries (dps_fast.blockwise)
    round_seed                int: the seed of its stochastic-rounding bits (dps_fast.rounding),
                              present once a step has drawn them
    mask                      packed subnetwork bits: 1-D uint8, packed_size(p.numel()) bytes
    mix_init, mix_snapshot    DPS-Mix targets (W0, stage snapshot): p's shape and dtype
    mix_count                 DPS-Mix keep counts: fp32, one per input column of a matrix
    score_stage, mask_stage, snapshot_stage
                              int tags: the first step of the stage the entry belongs to

`check_update` (and `check_entries`) is the host layer shared by the fast backends (and run by
DPSAdamW.step over every group before anything changes): it rejects any
tensor whose shape, dtype or device does not fit its parameter, so that no
kernel is given a buffer shorter than what it indexes. Layout (strides) is
the backends' business: a tensor that fits but is not contiguous is handed
to the reference backend, or copied (dps_fast/backends).
`in_format` converts an entry's moments and score to a state format (at a
load, or when a group's state_dtype was changed by hand: fp32, bf16 and 8-bit
state into one another); `adopt` brings each loaded tensor to the form the
checks accept (floats of another dtype cast to the state dtype, as torch's
load casts state to its parameter's; a bool mask packed; other strides copied
to the parameter's) and rejects it otherwise; `check_complete` rejects an
entry that lacks a piece the step reads.
"""
import operator

import torch

from . import blockwise, distributed
from . import state_format as formats
from .selection import pack_mask, packed_size, unpack_mask

LIKE_PARAM = formats.STATE_KEYS  # p's shape, state_dtype(p, format, key)
SCALES = tuple(formats.SCALE_KEYS.values())  # 8-bit moments' block scales
TAGS = ("score_stage", "mask_stage", "snapshot_stage")
INTEGERS = ("step", "round_seed") + TAGS  # whole numbers >= 0

_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_numel = torch.Tensor.numel


def state_dtype(param, format="fp32", key="exp_avg"):
    """The dtype of a parameter's state tensor `key` (a moment, the score, a block scale)
    in state format `format` (a name of dps_fast.state_format): fp32, bf16 or uint8 codes,
    float64 for float64 parameters."""
    return formats.of(format).dtype_for(param, key)


def zeros(param, format="fp32", key="exp_avg"):
    """State tensor `key` of `param` for a zero moment or score: its shape and strides, or
    for block scales one per block; state_dtype(param, format, key)."""
    if key in SCALES:
        return torch.zeros(blockwise.num_blocks(param.numel()), device=param.device)
    if formats.of(format).for_param(param).quantized and key in formats.SIGNED:
        return blockwise.zero_codes(param, formats.SIGNED[key])
    return torch.zeros_like(param, dtype=state_dtype(param, format, key))


def zero_state(param, format, keys):
    """{key: zeros(param, format, key)} for `keys` (moments or the score), and the block
    scales of those moments the format quantizes for `param`."""
    quantized = formats.of(format).for_param(param).quantized
    keys = [*keys, *(formats.SCALE_KEYS[key] for key in keys if quantized and key in formats.SCALE_KEYS)]
    return {key: zeros(param, format, key) for key in keys}


def bool_mask(param, bits):
    """The bool mask of `param` from its packed mask (a DTensor for a DTensor param)."""
    if distributed.is_dtensor(param):
        return distributed.unpacked_mask(param, bits)
    return unpack_mask(bits, param.shape)


def mix_count_shape(param):
    """DPS-Mix counts keeps per input column of a matrix, per entry otherwise."""
    return param.shape[-1:] if param.dim() == 2 else param.shape


def _expected(param, key, format="fp32"):
    """(shape, dtype) a tensor entry `key` of param's state must have, or None if any."""
    if key in LIKE_PARAM:
        return param.shape, state_dtype(param, format, key)
    if key in SCALES:  # where the format quantizes param's moments; elsewhere unused (in_format drops them)
        if not formats.of(format).for_param(param).quantized:
            return None
        return torch.Size([blockwise.num_blocks(param.numel())]), torch.float32
    if key == "mask":  # a DTensor parameter's mask covers its local shard
        return torch.Size([packed_size(distributed.local(param).numel())]), torch.uint8
    if key in ("mix_init", "mix_snapshot"):
        return param.shape, param.dtype
    if key == "mix_count":
        return mix_count_shape(param), torch.float32
    return None


def _describe(tensor):
    return f"a {tensor.dtype} tensor of shape {tuple(tensor.shape)} on {tensor.device}"


def misfit(param, key, value, format="fp32"):
    """None if `value` fits entry `key` of param's state (in state format `format`), else
    what was expected."""
    expected = _expected(param, key, format)
    if expected is None:
        return None
    shape, dtype = expected
    if not isinstance(value, torch.Tensor):
        return f"expected a tensor, got {type(value).__name__}"
    local = distributed.local(param)
    if value.shape != shape or value.dtype != dtype or value.device != local.device:
        what = ("packed mask bits" if key == "mask" else f"a scale per {blockwise.BLOCK} entries" if key in SCALES
                else "the parameter's shape" if shape == param.shape else "shape")
        return f"is {_describe(value)}; expected {dtype} of shape {tuple(shape)} ({what}) on {local.device}"
    return None


def adopt(param, key, value, where, format="fp32"):
    """Entry `key` of a loaded state brought to the form misfit() accepts in state format
    `format`, as a new tensor: tags, steps and seeds to ints, floats of another dtype to
    the format's dtype (rounded to nearest: a conversion is deterministic), a bool mask of
    the parameter's shape packed, tensors to the parameter's device and strides.
    Raises ValueError naming `where` (the parameter) and the key otherwise."""
    if key in INTEGERS:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
                or value < 0:
            raise ValueError(f"{where}: state {key!r} must be an integer >= 0; got {value!r}")
        return int(value)
    expected = _expected(param, key, format)
    if expected is None or not isinstance(value, torch.Tensor):
        return value
    shape, dtype = expected
    device = distributed.local(param).device
    loaded = value
    if key == "mask" and value.dtype == torch.bool and value.shape == param.shape:
        value = pack_mask(value.to(device))
    elif value.shape == shape and (value.dtype == dtype or value.is_floating_point() and dtype.is_floating_point):
        if value.dtype != dtype or value.device != device:
            value = value.to(device=device, dtype=dtype)
        if shape == param.shape and not distributed.is_dtensor(param) and value.stride() != param.stride():
            value = torch.empty_like(param, dtype=dtype).copy_(value)  # the parameter's layout
    problem = misfit(param, key, value, format)
    if problem is not None:
        raise ValueError(f"{where}: state {key!r} {problem}. The state does not belong to this parameter "
                         "(a checkpoint of another model, or a parameter reshaped after its state was made)")
    return value.clone() if value is loaded else value  # never shared with the state dict


MOMENTS = ("step", "exp_avg", "exp_avg_sq")  # created together; an entry has all or none
NEEDS = {"score_stage": "score", "mask_stage": "mask", "snapshot_stage": "mix_snapshot"}  # tag: its tensor


def check_complete(entry, mixed, where, quantized=False):
    """Raise ValueError naming `where` unless a loaded state entry holds every
    piece the step reads together: the moments with their step (and, `quantized`,
    their block scales), a tag with its tensor, and in a DPS-Mix group (`mixed`)
    the keep counts of a score stage."""
    moments = MOMENTS + (SCALES if quantized else ())
    present = [key for key in moments if key in entry]
    if present and len(present) != len(moments):
        missing = [key for key in moments if key not in entry]
        raise ValueError(f"{where}: state has {present} but not {missing} (AdamW's state needs all of "
                         f"{list(moments)})")
    needs = dict(NEEDS, **({"score_stage": ("score", "mix_count")} if mixed else {}))
    for tag, keys in needs.items():
        for key in (keys,) if isinstance(keys, str) else keys:
            if tag in entry and key not in entry:
                raise ValueError(f"{where}: state has {tag!r} but not {key!r}, the tensor it tags")


def in_format(param, entry, format):
    """State entry `entry` of `param` with its moments and score in state format `format`
    (a name), converted where they are stored otherwise, deterministically: floats of
    another dtype rounded to nearest, floats to 8-bit codes and block scales
    (blockwise.quantize), 8-bit codes to floats (blockwise.dequantize, then rounded to
    nearest), the scales of moments that are no longer 8-bit dropped. Returns `entry`
    itself if nothing changes, else a new dict (entry is never changed). Tensors that do
    not fit `param` are left as they are, for misfit to name."""
    target = formats.of(format).for_param(param)
    new = None
    for key in LIKE_PARAM:
        value, scale_key = entry.get(key), formats.SCALE_KEYS.get(key)
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            continue
        dtype = target.dtype_for(param, key)
        if value.dtype == dtype and scale_key not in entry:  # as stored (a float; or codes lacking their scales)
            continue
        scales = entry.get(scale_key)
        coded = value.dtype == torch.uint8 and isinstance(scales, torch.Tensor) and scales.is_floating_point() \
            and scales.shape == (blockwise.num_blocks(param.numel()),)
        if target.quantized and scale_key:
            if coded or not value.is_floating_point():
                continue
            converted = dict(zip((key, scale_key), blockwise.quantize(value.float(), formats.SIGNED[key])))
        elif coded:
            converted = {key: blockwise.dequantize(value, scales.to(value.device, torch.float32),
                                                   formats.SIGNED[key]).to(dtype), scale_key: None}
        elif value.is_floating_point() and value.dtype != dtype:
            converted = {key: value.to(dtype)}
        elif scale_key in entry:  # scales of a float moment: left from 8-bit state
            converted = {scale_key: None}
        else:
            continue
        new = dict(entry) if new is None else new
        new.update(converted)
    if new is None:
        return entry
    return {key: value for key, value in new.items() if value is not None}


def format_changes(states, group, params):
    """{param: entry}: the state entries of `params` brought to their group's state format
    where it was changed since they were made (group["state_dtype"] set by hand),
    converted as a load converts them (in_format). Nothing is changed: the caller checks
    with them (check_group's `changes`) and then stores them. Tensors that do not fit
    otherwise are left for check_group to name."""
    changes = {}
    for param in params:
        state = states.get(param) or {}
        entry = in_format(param, state, group["state_dtype"])
        if entry is not state:
            changes[param] = entry
    return changes


def check_group(states, group, params, index, changes=None):
    """ValueError naming the parameter (param_groups[index]['params'][j]) if the
    gradient or a state entry of one of `params` (of param group `group`) does not
    fit it: a parameter reshaped or moved through .data, or state set by hand.
    changes: {param: entry} to check in place of those entries (format_changes)."""
    if changes:
        states = {p: changes.get(p, states.get(p, {})) for p in params}
    have = [p for p in params if "exp_avg" in states.get(p, ())]

    def where(chosen):
        def name(i):
            position = next(j for j, p in enumerate(group["params"]) if p is chosen[i])
            return f"param_groups[{index}]['params'][{position}]"
        return name

    check_entries(distributed.local_all(params), "grad", distributed.local_all([p.grad for p in params]),
                  where(params))
    entries = {key: [states[p].get(key) for p in have] for key in ("exp_avg", "exp_avg_sq", "score", "mask")}
    for key, values in entries.items():
        chosen = [p for p, v in zip(have, values) if v is not None]
        if chosen:
            values = [v for v in values if v is not None]
            check_entries(distributed.local_all(chosen), key,
                          values if key == "mask" else distributed.local_all(values), where(chosen),
                          group["state_dtype"])
    format = formats.of(group["state_dtype"])
    quantized = [p for p in have if format.for_param(p).quantized] if format.quantized else []
    for key in SCALES if quantized else ():  # present too: None is "expected a tensor"
        check_entries(quantized, key, [states[p].get(key) for p in quantized], where(quantized), group["state_dtype"])


def check_update(params, grads, exp_avgs, exp_avg_sqs, scores=None, masks=None, where=None, device=None,
                 state_format="fp32"):
    """Raise ValueError unless, for every i, grads[i], exp_avgs[i], exp_avg_sqs[i]
    and scores[i] have params[i]'s shape and device, the moments and scores
    state_dtype(params[i], state_format), and masks[i] is params[i]'s packed mask
    (1-D uint8 of packed_size(numel) bytes, same device); and, if `device` is given
    (the one the kernels run on), every params[i] is on it. where(i) names params[i]
    in the message. A state format the kernels do not store yet is a ValueError too
    (state_format.kernel_refusal): this is the fast backends' check."""
    refusal = formats.kernel_refusal(state_format)
    if refusal is not None:
        raise ValueError(f"{refusal}: update such state with backend='torch'")
    if device is not None:
        check_device(params, device, "params")
    entries = dict(grad=grads, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs, score=scores, mask=masks)
    for key, values in entries.items():
        if values is not None:
            check_entries(params, key, values, where, state_format)


def check_entries(params, key, values, where=None, format="fp32"):
    """Raise ValueError unless values[i] fits entry `key` ("grad" or a state key) of
    params[i]'s state in state format `format` (misfit). The common case costs a few
    C-level passes."""
    if len(values) != len(params):
        raise ValueError(f"{len(values)} {key} tensors for {len(params)} params")
    if key == "mask":
        fits = (list(map(_shape, values)) == [torch.Size([packed_size(n)]) for n in map(_numel, params)]
                and all(d == torch.uint8 for d in map(_dtype, values)))
    elif key in SCALES:
        fits = False  # 8-bit state (the reference backend's): each one checked
    else:
        fits = list(map(_shape, values)) == list(map(_shape, params)) and (key == "grad" or list(map(
            _dtype, values)) == _state_dtypes(params, format, key))
    if fits and list(map(_device, values)) == list(map(_device, params)):
        return
    for i, value in enumerate(values):
        problem = _grad_misfit(params[i], value) if key == "grad" else misfit(params[i], key, value, format)
        if problem is not None:
            name = where(i) if where else f"params[{i}]"
            raise ValueError(f"{name}: {'its gradient' if key == 'grad' else f'state {key!r}'} {problem}")


def _state_dtypes(params, format, key):
    """[state_dtype(p, format, key) for p in params], in one C-level pass where the format
    keeps every tensor in its own dtypes."""
    format = formats.of(format)
    if format.small:  # the dtype depends on the tensor
        return [format.dtype_for(param, key) for param in params]
    stored = format.score_dtype if key == "score" else format.dtype
    return [torch.float64 if d == torch.float64 else stored for d in map(_dtype, params)]


def _grad_misfit(param, grad):
    if grad.shape != param.shape or grad.device != param.device or not grad.is_floating_point():
        return f"is {_describe(grad)}; expected a float tensor of shape {tuple(param.shape)} on {param.device}"
    return None


def check_device(tensors, device, what):
    """Raise ValueError unless every tensor is on `device`, the one a kernel launch runs on."""
    if all(d == device for d in map(_device, tensors)):
        return
    i, tensor = next((i, t) for i, t in enumerate(tensors) if t.device != device)
    raise ValueError(f"{what}[{i}] is on {tensor.device}; this call's kernels run on {device} "
                     "(give one backend call the tensors of one device)")


def check_masks(grads, masks, device=None):
    """Raise ValueError unless masks[i] is grads[i]'s packed mask (masked_norms' inputs),
    and, if `device` is given, every grads[i] is on it."""
    if device is not None:
        check_device(grads, device, "grads")
    if len(grads) != len(masks):
        raise ValueError(f"{len(masks)} masks for {len(grads)} gradients")
    for i, (grad, bits) in enumerate(zip(grads, masks)):
        problem = misfit(grad, "mask", bits)
        if problem is not None:
            raise ValueError(f"masks[{i}] {problem}")
