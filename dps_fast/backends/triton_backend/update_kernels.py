"""The DPS update as one Triton launch per call (per dtype pair of params and
grads): explore, exploit ("grad" or "freeze") or plain AdamW, the mode of
dps_fast.backends.contract.

All math is fp32; params may be fp32, bf16 or fp16 (float64 ones, whose state
is float64, go to the reference backend), grads any float dtype; the state is
fp32 or bf16 (dps_fast.state_format), and stores round stochastically where
the format or the rounding says so, with dps_fast.rounding's random bits (the
same, to the bit, as every backend's). The update is memory-bound: the bytes
it moves per entry are dps_fast/bench/bytes_model.py's.
GradScaler's inv_scale and found_inf are read in the kernel: the gradient is
multiplied by *inv_scale before scoring, and when *found_inf != 0 every
program returns before reading anything (no host sync, nothing written). The
clip factor (grad_coef) applies after scoring, as in the reference.
"""
import torch
import triton
import triton.language as tl

from ... import param_state
from ... import rounding as rounding_bits
from ... import state_format as formats
from .. import reference
from ..contract import Mode, mode_of
from .tables import (CHUNK, INTERPRETED, INTERPRETER_CONFIG, TL_DTYPES, address, addressable, chunk_of_program,
                     launching_on, upload)

# Columns of a row of the update's table, after NUMEL and FIRST_CHUNK (Note [table layout]);
# KEY_A, KEY_B: the step's stream keys, OFFSET: entry 0's index in the whole tensor (rounding).
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, SCORE, MASK_BITS, RESET, KEY_A, KEY_B, OFFSET = (tl.constexpr(i)
                                                                                   for i in range(2, 12))
FIELDS = tl.constexpr(12)

# contract.Mode, as the kernel's compile-time constants.
EXPLORE, EXPLOIT_GRAD, EXPLOIT_FREEZE = (tl.constexpr(int(mode)) for mode in
                                         (Mode.EXPLORE, Mode.EXPLOIT_GRAD, Mode.EXPLOIT_FREEZE))

GPU_CONFIGS = ((1024, 4), (2048, 8), (4096, 8))  # (BLOCK, num_warps) tried by _config
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)  # Note [interpreter]


@triton.jit
def _adamw(p, g, m, v, decay, lerp_weight, beta2, one_minus_beta2, eps, neg_step_size, bias_correction2_sqrt):
    """One AdamW step in fp32 in reference.adamw_math's (torch.optim.AdamW's) order of
    operations; lerp as torch computes it for weights below 0.5 (beta1 > 0.5)."""
    p = p * decay
    m = m + lerp_weight * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    return p + tl.div_rn(neg_step_size * m, denom), m, v


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 `x` rounded to nearest even in DTYPE (a GPU's conversion does so). Triton's
    interpreter truncates fp32 -> bf16, which drifts a bf16 parameter by up to an ulp per
    step: there, round on the bits."""
    if _ROUND_BF16_BY_HAND and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


# ----- stochastic rounding: dps_fast/rounding.py is the specification ----------------

@triton.jit
def _mix32(x):
    """lowbias32 on uint32 values."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _stochastic_bf16(x, r16):
    """fp32 x rounded to bf16 with 16 random bits (rounding.stochastic), as a bf16 tensor."""
    u = x.to(tl.uint32, bitcast=True)
    up = (u + r16) >> 16
    down = u >> 16
    finite = (u & 0x7F800000) != 0x7F800000
    bits = tl.where(((up & 0x7F80) == 0x7F80) & finite, down, up)
    bits = tl.where(x != x, 0x7FC0, bits)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _stochastic_f16(x, r16):
    """fp32 x rounded to fp16 with 16 random bits (rounding.stochastic), as an fp16 tensor."""
    u = x.to(tl.uint32, bitcast=True)
    sign = u & tl.full([], 0x80000000, tl.uint32)
    magnitude = u & 0x7FFFFFFF
    exponent = (magnitude >> 23).to(tl.int32)
    normal_up = ((magnitude + (r16 >> 3)) >> 13) - (112 << 10)
    normal_down = (magnitude >> 13) - (112 << 10)
    drop = tl.minimum(tl.maximum(126 - exponent, 14), 40)
    significand = ((magnitude & 0x7FFFFF) | tl.where(exponent > 0, 0x800000, 0)).to(tl.uint64)
    wide = r16.to(tl.uint64)
    noise = tl.where(drop <= 16, wide >> tl.maximum(16 - drop, 0).to(tl.uint64),
                     wide << tl.maximum(drop - 16, 0).to(tl.uint64))
    small_up = ((significand + noise) >> drop.to(tl.uint64)).to(tl.uint32)
    small_down = (significand >> drop.to(tl.uint64)).to(tl.uint32)
    up = tl.where(exponent < 113, small_up, normal_up)
    down = tl.where(exponent < 113, small_down, normal_down)
    up = tl.where((up >= 0x7C00) & (magnitude < 0x477FF000), down, up)
    up = tl.where(magnitude >= 0x477FF000, 0x7C00, up)
    bits = tl.where(x != x, 0x7E00, up) | (sign >> 16)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _store(x, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, r16):
    """fp32 x as stored in DTYPE: stochastically with the random bits r16, or to nearest."""
    if STOCHASTIC and DTYPE == tl.bfloat16:
        return _stochastic_bf16(x, r16)
    if STOCHASTIC and DTYPE == tl.float16:
        return _stochastic_f16(x, r16)
    return _round(x, DTYPE)


@triton.jit
def _update_kernel(rows_ptr, owners_ptr, coefs_ptr, inv_scale_ptr, found_inf_ptr, grad_coef_ptr,
                   decay, lerp_weight, beta2, one_minus_beta2, eps,
                   PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MODE: tl.constexpr,
                   STATE_DTYPE: tl.constexpr, SR_STATE: tl.constexpr, SR_PARAM: tl.constexpr,
                   HAS_INV_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_COEF: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    found_inf = 0.0
    if HAS_FOUND_INF:
        found_inf = tl.load(found_inf_ptr)
    if found_inf == 0:  # a step the GradScaler skips writes nothing
        tensor, row, start, length = chunk_of_program(rows_ptr, owners_ptr, FIELDS, CHUNK)
        inv_scale = 1.0
        if HAS_INV_SCALE:
            inv_scale = tl.load(inv_scale_ptr).to(tl.float32)
        grad_coef = 1.0
        if HAS_GRAD_COEF:
            grad_coef = tl.load(grad_coef_ptr).to(tl.float32)
        # Score and mask addresses are 0 when absent; only the modes that have them use them.
        ptrs = (address(row, PARAM, PARAM_DTYPE, start), address(row, GRAD, GRAD_DTYPE, start),
                address(row, EXP_AVG, STATE_DTYPE, start), address(row, EXP_AVG_SQ, STATE_DTYPE, start),
                address(row, SCORE, STATE_DTYPE, start), address(row, MASK_BITS, tl.uint8, start // 8))
        scalars = (inv_scale, grad_coef, decay, lerp_weight, beta2, one_minus_beta2, eps,
                   tl.load(coefs_ptr + 2 * tensor), tl.load(coefs_ptr + 2 * tensor + 1))
        random = (tl.load(row + KEY_A).to(tl.uint32), tl.load(row + KEY_B).to(tl.uint32),
                  tl.load(row + OFFSET) + start)  # the keys, and the chunk's first index in the whole tensor
        keep_scores = tl.load(row + RESET) == 0
        whole = length // BLOCK * BLOCK  # Note [whole blocks, then the tail]
        _update_span(0, whole, keep_scores, ptrs, scalars, random, PARAM_DTYPE, MODE, STATE_DTYPE, SR_STATE,
                     SR_PARAM, BLOCK)
        _update_span(whole, length, keep_scores, ptrs, scalars, random, PARAM_DTYPE, MODE, STATE_DTYPE, SR_STATE,
                     SR_PARAM, BLOCK)


@triton.jit
def _update_span(first, last, keep_scores, ptrs, scalars, random, PARAM_DTYPE: tl.constexpr, MODE: tl.constexpr,
                 STATE_DTYPE: tl.constexpr, SR_STATE: tl.constexpr, SR_PARAM: tl.constexpr, BLOCK: tl.constexpr):
    """Update entries [first, last) of a chunk, BLOCK at a time."""
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, score_ptr, bits_ptr = ptrs
    inv_scale, grad_coef, decay, lerp_weight, beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt = scalars
    key_a, key_b, base = random
    old_scores_last = tl.where(keep_scores, last, first)  # a reset does not read the old scores
    for block in range(first, last, BLOCK):
        idx = block + tl.arange(0, BLOCK)
        live = idx < last
        word_a = tl.zeros([BLOCK], dtype=tl.uint32)
        word_b = tl.zeros([BLOCK], dtype=tl.uint32)
        if SR_STATE or SR_PARAM:  # rounding.entry_words of the entries' indices in the whole tensor
            index = base + idx.to(tl.int64)
            high = (index >> 32).to(tl.uint32)
            low = (index & 0xFFFFFFFF).to(tl.uint32)
            word_a = _mix32(_mix32(key_a ^ high) ^ low)
            word_b = _mix32(_mix32(key_b ^ high) ^ low)
        grad = tl.load(grad_ptr + idx, mask=live, other=0.0).to(tl.float32) * inv_scale
        if MODE == EXPLORE:  # the unclipped gradient
            score = tl.load(score_ptr + idx, mask=idx < old_scores_last, other=0.0).to(tl.float32)
            tl.store(score_ptr + idx, _store(score + grad * grad, STATE_DTYPE, SR_STATE, word_b & 0xFFFF),
                     mask=live)
        grad = grad * grad_coef
        write = live
        if MODE == EXPLOIT_GRAD or MODE == EXPLOIT_FREEZE:
            # chunks start on a multiple of 8 entries: bit idx % 8 of byte idx // 8
            kept = ((tl.load(bits_ptr + (idx >> 3), mask=live, other=0).to(tl.int32) >> (idx & 7)) & 1) != 0
            if MODE == EXPLOIT_GRAD:  # grad * mask, as the reference: an inf masked out gives NaN
                grad = grad * kept.to(tl.float32)
            else:
                write = live & kept
        param = tl.load(param_ptr + idx, mask=live, other=0.0).to(tl.float32)
        exp_avg = tl.load(exp_avg_ptr + idx, mask=live, other=0.0).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + idx, mask=live, other=0.0).to(tl.float32)
        param, exp_avg, exp_avg_sq = _adamw(param, grad, exp_avg, exp_avg_sq, decay, lerp_weight, beta2,
                                            one_minus_beta2, eps, neg_step_size, bc2_sqrt)
        tl.store(param_ptr + idx, _store(param, PARAM_DTYPE, SR_PARAM, word_b >> 16), mask=write)
        tl.store(exp_avg_ptr + idx, _store(exp_avg, STATE_DTYPE, SR_STATE, word_a & 0xFFFF), mask=write)
        tl.store(exp_avg_sq_ptr + idx, _store(exp_avg_sq, STATE_DTYPE, SR_STATE, word_a >> 16), mask=write)


def _scalar(value, device):
    return None if value is None else value.reshape(()).to(device, non_blocking=True)


def update(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
           grad_coef=None, scores=None, reset_scores=None, masks=None, freeze=False,
           inv_scale=None, found_inf=None, state_format="fp32", rounding="nearest", seeds=None, offsets=None,
           exp_avg_scales=None, exp_avg_sq_scales=None):
    """Update every tensor of one group in place; semantics of reference.update (which
    updates the float64 parameters, whose state is float64: dps_fast.param_state), for the
    state formats the kernels store (param_state.check_update refuses the others)."""
    if not params:
        return
    param_state.check_update(params, grads, exp_avgs, exp_avg_sqs, scores, masks, device=params[0].device,
                             state_format=state_format)
    float64s = [i for i, param in enumerate(params) if param.dtype == torch.float64]
    if float64s:
        reference.update_some(float64s, params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1,
                              beta2=beta2, eps=eps, weight_decay=weight_decay, grad_coef=grad_coef, scores=scores,
                              reset_scores=reset_scores, masks=masks, freeze=freeze, inv_scale=inv_scale,
                              found_inf=found_inf, state_format=state_format, rounding=rounding, seeds=seeds,
                              offsets=offsets)
    live = [i for i, param in enumerate(params) if param.numel() and param.dtype != torch.float64]
    if not live:
        return
    lr = float(lr)
    device = params[live[0]].device
    mode = mode_of(scores, masks, freeze)
    hyper = dict(decay=1 - lr * weight_decay, lerp_weight=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
                 eps=eps)
    hyper = {name: float(value) for name, value in hyper.items()}
    scalars = dict(inv_scale=_scalar(inv_scale, device), found_inf=_scalar(found_inf, device),
                   grad_coef=_scalar(grad_coef, device))
    by_dtypes = {}  # one launch per (param dtype, grad dtype): the kernel's pointer types
    for i in live:
        by_dtypes.setdefault((params[i].dtype, grads[i].dtype), []).append(i)
    format = formats.of(state_format)
    for (param_dtype, grad_dtype), indices in by_dtypes.items():
        def pick(values):
            return None if values is None else [values[i] for i in indices]

        random = formats.needs_random_bits(format, rounding, params[indices[0]])
        keys = [(0, 0)] * len(indices)
        if random:
            if seeds is None or any(seeds[i] is None for i in indices):
                raise ValueError(f"state_format={state_format!r}, rounding={rounding!r}: every tensor needs its seed")
            keys = [rounding_bits.stream_keys(seeds[i], steps[i]) for i in indices]

        # Referenced here until the launch is queued (Note [table layout]; a first call's tuning allocates).
        copy_back = []
        ready = dict(params=addressable(pick(params), copy_back), grads=addressable(pick(grads)),
                     exp_avgs=addressable(pick(exp_avgs), copy_back),
                     exp_avg_sqs=addressable(pick(exp_avg_sqs), copy_back),
                     scores=addressable(pick(scores), copy_back), masks=addressable(pick(masks)))
        tables = _tables(device, lr, beta1, beta2, steps=pick(steps), reset_scores=pick(reset_scores), keys=keys,
                         offsets=pick(offsets) or [0] * len(indices), **ready)
        variant = (param_dtype, grad_dtype, mode, format.dtype, format.stochastic,
                   rounding == "stochastic" and param_dtype != torch.float32)
        with launching_on(device):
            _launch(tables, variant, hyper, scalars, _config(device, variant))
        for tensor, copy in copy_back:
            tensor.copy_(copy)


def _tables(device, lr, beta1, beta2, params, grads, exp_avgs, exp_avg_sqs, scores, reset_scores, masks, steps,
            keys, offsets):
    """The update kernel's tables (tables.upload): addresses, reset flags, the random bits'
    keys and offsets, bias corrections."""
    def address_of(tensors, i):
        return 0 if tensors is None else tensors[i].data_ptr()

    fields = [[params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
               address_of(scores, i), address_of(masks, i), int(scores is not None and reset_scores[i]),
               keys[i][0], keys[i][1], offsets[i]] for i in range(len(params))]
    coefs = []
    for step in steps:  # bias corrections, computed in double as the reference does
        coefs += [-lr / (1 - beta1**step), (1 - beta2**step) ** 0.5]
    return upload(device, fields, [p.numel() for p in params], floats=coefs)


def _launch(tables, variant, hyper, scalars, config):
    (rows, owners, _, coefs), n_chunks = tables
    param_dtype, grad_dtype, mode, state_dtype, sr_state, sr_param = variant
    block, num_warps = config
    _update_kernel[(n_chunks,)](
        rows, owners, coefs, scalars["inv_scale"], scalars["found_inf"], scalars["grad_coef"], **hyper,
        PARAM_DTYPE=TL_DTYPES[param_dtype], GRAD_DTYPE=TL_DTYPES[grad_dtype], MODE=int(mode),
        STATE_DTYPE=TL_DTYPES[state_dtype], SR_STATE=sr_state, SR_PARAM=sr_param,
        HAS_INV_SCALE=scalars["inv_scale"] is not None, HAS_FOUND_INF=scalars["found_inf"] is not None,
        HAS_GRAD_COEF=scalars["grad_coef"] is not None, CHUNK=CHUNK, BLOCK=block, num_warps=num_warps)


_tuned = {}


def _config(device, variant):
    """(BLOCK, num_warps) for an update kernel variant: on a GPU the fastest of GPU_CONFIGS
    on a scratch tensor of 8M entries (the update is in place, so the caller's tensors
    cannot be used), timed once per variant and device."""
    if INTERPRETED:
        return INTERPRETER_CONFIG
    key = (device, variant)
    if key not in _tuned:
        from triton.testing import do_bench

        param_dtype, grad_dtype, mode, state_dtype = variant[:4]
        n = 1 << 23  # 8M entries, past the L2 cache

        def zeros(dtype=state_dtype, numel=n):
            return [torch.zeros(numel, dtype=dtype, device=device)]

        # held until the timing is done: the table keeps only their addresses
        scratch = dict(params=zeros(param_dtype), grads=zeros(grad_dtype), exp_avgs=zeros(), exp_avg_sqs=zeros(),
                       scores=zeros() if mode == Mode.EXPLORE else None,
                       masks=zeros(torch.uint8, n // 8) if mode in (Mode.EXPLOIT_GRAD, Mode.EXPLOIT_FREEZE) else None)
        tables = _tables(device, 1e-3, 0.9, 0.999, reset_scores=[False], steps=[1], keys=[(1, 2)], offsets=[0],
                         **scratch)
        hyper = dict(decay=1.0, lerp_weight=0.1, beta2=0.999, one_minus_beta2=0.001, eps=1e-8)
        scalars = dict(inv_scale=None, found_inf=None, grad_coef=None)
        with launching_on(device):
            times = [do_bench(lambda: _launch(tables, variant, hyper, scalars, config), warmup=5, rep=20)
                     for config in GPU_CONFIGS]
        _tuned[key] = GPU_CONFIGS[times.index(min(times))]
    return _tuned[key]
