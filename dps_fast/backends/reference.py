"""Pure-PyTorch backend: the executable specification of one DPS update.

Short and obvious on purpose; every fast backend is tested against it.
All arithmetic is fp32 whatever the parameter dtype and the state format
(dps_fast.state_format), float64 for float64 parameters: each state entry is
loaded, updated in fp32 and stored once, rounded stochastically where the
format or the rounding option says so (dps_fast.rounding), an 8-bit moment
dequantized on load and requantized block by block on store (dps_fast.blockwise).
"""
import torch

from .. import blockwise
from .. import rounding as random_rounding
from .. import selection
from .. import state_format as formats

NAME = "torch"


def unavailable_reason(device: torch.device):
    """None: plain PyTorch runs on every device."""
    return None


def adamw_math(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step out of place, op for op as torch.optim.AdamW (so that the
    two agree to the bit). Returns the new (param, exp_avg, exp_avg_sq)."""
    param = param * (1 - lr * weight_decay)
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    return param.addcdiv_(exp_avg, denom, value=-step_size), exp_avg, exp_avg_sq


def update(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
           grad_coef=None, scores=None, reset_scores=None, masks=None, freeze=False,
           inv_scale=None, found_inf=None, state_format="fp32", rounding="nearest", seeds=None, offsets=None,
           exp_avg_scales=None, exp_avg_sq_scales=None):
    """Update every tensor of one group in place.

    lr: a float, or a 0-dim tensor (rounded as torch.optim.AdamW rounds a tensor lr).

    steps: the bias-correction step of each tensor, already advanced.
    grad_coef: optional 0-dim tensor (a pending gradient-clip factor) applied to
        the gradient the update uses, not to the one that is scored.
    scores / reset_scores: explore steps: score := g*g where reset, else += g*g.
    masks: exploit steps: packed masks (dps_fast.selection); freeze=False zeroes the masked-out
        gradient (published "grad" semantics), freeze=True leaves masked-out
        entries and their moments untouched.
    inv_scale / found_inf: optional 0-dim fp32 tensors from a GradScaler: the
        gradient is multiplied by inv_scale before anything else (scoring
        included), and nothing at all is written when found_inf is nonzero.
    state_format: the name of the state's format (dps_fast.state_format): the
        dtype exp_avg, exp_avg_sq and scores are stored in, and whether they
        are stored with stochastic rounding; each tensor's state is in the
        format's for_param(tensor) (an 8-bit format keeps small tensors in bf16).
    rounding: "nearest" or "stochastic", how a bf16/fp16 parameter is stored.
    seeds / offsets: per tensor, the seed of its stochastic-rounding bits and the
        index in the whole tensor of its first entry (a shard's; default 0), needed
        when the format or the rounding draws bits (dps_fast.rounding).
    exp_avg_scales / exp_avg_sq_scales: per tensor, the block scales of its 8-bit exp_avg /
        exp_avg_sq (1-D fp32, its state entries exp_avg_scale / exp_avg_sq_scale), updated in
        place with the codes; None, or None entries, where the moments are floats. A store
        requantizes each block after the update of all its entries; with freeze=True see
        _store_moment for the blocks with frozen entries.
    """
    if found_inf is not None and found_inf.item() != 0:
        return
    group_format = formats.of(state_format)
    for i, param in enumerate(params):
        format = group_format.for_param(param)
        compute = torch.float64 if param.dtype == torch.float64 else torch.float32
        words = _random_words(group_format, rounding, param, seeds, offsets, i, steps[i])
        avg_scales, sq_scales = _scales(format, exp_avg_scales, i), _scales(format, exp_avg_sq_scales, i)
        grad = grads[i].to(compute)
        if inv_scale is not None:
            grad = grad * inv_scale
        state_bits = words if format.stochastic else None  # which stores round stochastically
        param_bits = words if rounding == "stochastic" else None
        if scores is not None:
            score = grad * grad if reset_scores[i] else scores[i].to(compute).addcmul_(grad, grad)
            _store(scores[i], score, _bits(state_bits, "score"))
        if grad_coef is not None:  # in the compute dtype: a float64 clip factor must not promote a 0-dim grad
            grad = grad * grad_coef.to(compute)
        mask = None if masks is None else selection.unpack_mask(masks[i], param.shape)
        if mask is not None and not freeze:
            grad = grad * mask
        avg = _load(exp_avgs[i], avg_scales, "exp_avg", compute)
        avg_sq = _load(exp_avg_sqs[i], sq_scales, "exp_avg_sq", compute)
        new_param, new_avg, new_avg_sq = adamw_math(param.to(compute), grad, avg, avg_sq, steps[i], lr, beta1,
                                                    beta2, eps, weight_decay)
        keep = mask if freeze else None
        _store(param, new_param, _bits(param_bits, "param"), keep)
        _store_moment(exp_avgs[i], avg_scales, new_avg, avg, "exp_avg", _bits(state_bits, "exp_avg"), keep)
        _store_moment(exp_avg_sqs[i], sq_scales, new_avg_sq, avg_sq, "exp_avg_sq", _bits(state_bits, "exp_avg_sq"),
                      keep)


# The 16 random bits of each store of an entry: (stream, shift) in dps_fast.rounding's two words.
RANDOM_BITS = {"exp_avg": (0, 0), "exp_avg_sq": (0, 16), "score": (1, 0), "param": (1, 16)}


def _random_words(format, rounding, param, seeds, offsets, i, step):
    """The two stochastic-rounding words of every entry of `param` (p's shape), or None
    when none of its stores rounds stochastically."""
    if not formats.needs_random_bits(format, rounding, param):
        return None
    if seeds is None or seeds[i] is None:
        raise ValueError(f"state_format={format.name!r}, rounding={rounding!r}: tensor {i} needs its seed")
    offset = 0 if offsets is None else offsets[i]
    index = offset + torch.arange(param.numel(), dtype=torch.int64, device=param.device).view(param.shape)
    return [random_rounding.entry_words(key, index) for key in random_rounding.stream_keys(seeds[i], step)]


def _bits(words, role):
    """The 16 random bits of store `role` of every entry, or None."""
    if words is None:
        return None
    stream, shift = RANDOM_BITS[role]
    return (words[stream] >> shift) & 0xFFFF


def _store(stored, value, r16, keep=None):
    """stored := value (fp32 or float64) rounded to stored's dtype: stochastically with the
    random bits `r16` if given and stored is bf16/fp16, else to nearest (torch's copy_).
    keep: a bool mask outside which stored is left as it is."""
    if r16 is not None and stored.dtype in (torch.bfloat16, torch.float16):
        value = random_rounding.stochastic(value, stored.dtype, r16)
    if keep is not None:
        value = torch.where(keep, value.to(stored.dtype), stored)
    stored.copy_(value)


def _scales(format, scales, i):
    """Tensor i's block scales of one moment if `format` (its own) quantizes it, else None."""
    if not format.quantized:
        return None
    if scales is None or scales[i] is None:
        raise ValueError(f"state_format={format.name!r}: tensor {i} needs the block scales of its moments")
    return scales[i]


def _load(stored, scales, key, compute):
    """Moment `key` in the compute dtype: dequantized if 8-bit (`scales` given)."""
    if scales is None:
        return stored.to(compute)
    return blockwise.dequantize(stored, scales, formats.SIGNED[key])


def _store_moment(stored, scales, value, loaded, key, r16, keep):
    """Moment `key` := value as _store does, or if 8-bit (`scales` given) its codes and
    scales := value's blocks quantized. With `keep` (freeze): a block with no entry in
    keep keeps its codes and scale; a block with some entries in keep and some out takes
    as scale the larger of its old one and the absmax of its updated entries, and its
    frozen entries keep their codes when that scale is the old one, else are requantized
    from their `loaded` values. (Requantizing frozen entries at the absmax of all would
    shrink them: the signed map has no -1, so a frozen negative extreme reads back as
    0.993 of the scale, and the block would lose 0.7% a step.)"""
    if scales is None:
        return _store(stored, value, r16, keep)
    signed = formats.SIGNED[key]
    if keep is None:
        codes, new_scales = blockwise.quantize(value, signed)
    else:
        frozen_rows = blockwise.blocks_of(~keep)
        kept, frozen = blockwise.blocks_of(keep).any(dim=1), frozen_rows.any(dim=1)
        updated_absmax = blockwise.scales_of(blockwise.blocks_of(torch.where(keep, value, 0.0)))
        new_scales = torch.where(frozen, torch.maximum(scales, updated_absmax), updated_absmax)
        codes, new_scales = blockwise.quantize(torch.where(keep, value, loaded), signed, new_scales)
        new_scales = torch.where(kept, new_scales, scales)
        keeps_code = frozen_rows & (~kept | (new_scales == scales))[:, None]
        codes = blockwise.entries_of(torch.where(keeps_code, blockwise.blocks_of(stored), blockwise.blocks_of(codes)),
                                     stored.shape)
    stored.copy_(codes)
    scales.copy_(new_scales)


def update_some(indices, params, grads, exp_avgs, exp_avg_sqs, steps, *, scores=None, reset_scores=None,
                masks=None, seeds=None, offsets=None, exp_avg_scales=None, exp_avg_sq_scales=None, **hyper):
    """update() of the tensors at `indices` of the lists: the fast backends' fallback
    for the tensors their kernels do not take (float64, non-contiguous, ...)."""
    def pick(values):
        return None if values is None else [values[i] for i in indices]

    update(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(steps), scores=pick(scores),
           reset_scores=pick(reset_scores), masks=pick(masks), seeds=pick(seeds), offsets=pick(offsets),
           exp_avg_scales=pick(exp_avg_scales), exp_avg_sq_scales=pick(exp_avg_sq_scales), **hyper)


def masked_norms(grads, masks):
    """1-D float64 tensor: the L2 norm of each grad * its (packed) mask, the squares
    summed in float64 (each one exact for gradients up to fp32) and the root rounded to
    the gradient's dtype, as torch.nn.utils.clip_grad_norm_'s norm of that gradient is
    (float64 holds each value exactly). Every backend gives these values to the bit
    (an inf masked out gives NaN)."""
    return torch.stack([_rounded(torch.linalg.vector_norm(grad * selection.unpack_mask(bits, grad.shape),
                                                          dtype=torch.float64), grad.dtype)
                        for grad, bits in zip(grads, masks)])


def norms_from_squares(squared_sums, dtype):
    """masked_norms' values from float64 sums of squares of gradients of `dtype`."""
    return _rounded(squared_sums.sqrt(), dtype)


def _rounded(norms, dtype):
    return norms.to(dtype).double()


def select_masks(scores, sparsity):
    """One packed mask per score tensor (see dps_fast.selection)."""
    return [selection.pack_mask(selection.select_mask(score, sparsity)) for score in scores]
