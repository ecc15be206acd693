"""Triton backend: the DPS update and the per-tensor selection as Triton kernels.

Same contract and semantics as reference.py (the executable spec).

The update is memory-bound, so the design counts bytes. One launch per step
(per dtype pair of params/grads in the list; usually one) covers all tensors:
a small int64 table, built on the host and copied to the device in one
transfer, holds a row per non-empty tensor (addresses, numel, first chunk,
score-reset flag), the owning tensor of every chunk of CHUNK entries, and the
fp32 bias-correction values of each tensor (steps are host ints per tensor).
One program updates one chunk: 64-bit arithmetic only for the chunk's base
addresses, 32-bit indices inside it. Whole BLOCKs first, then the tail, so
that the bounds of the main loop are multiples of BLOCK and, with every
tensor 16-byte aligned (copies are made of tensors that are not), loads and
stores compile to 16-byte vector accesses. All math is fp32; params may be
fp32/bf16/fp16 (float64 ones, whose state is float64, go to the reference
backend), grads any float dtype. Bytes per entry, fp32 params and grads
(bf16 saves 2 B on each of p read, p write and g read):
    plain AdamW      read p, g, m, v; write p, m, v           28 B
    explore          + read and write the score               36 B
                     (first step of a stage: score not read)  32 B
    exploit "grad"   + one packed mask bit                    28 1/8 B
    exploit "freeze" the same reads; masked-out entries are not written
so an exploit step costs about what a fused AdamW step does. GradScaler
support is in the kernel: the gradient is multiplied by *inv_scale before
scoring, and when *found_inf != 0 every program returns before reading
anything (no host sync, nothing written). The clip factor (grad_coef) applies
after scoring, as in the reference.

Selection: the k-th largest score of each tensor by a radix select over the
32 bits of an order-preserving key of the fp32 score (for scores >= 0, the
float's bits with the top bit set), 8 bits per pass: 4 histogram passes
(tl.histogram of one digit over the entries whose higher digits match the
prefix found so far; 256 bins per tensor, summed with atomics), each followed
by a one-program-per-tensor kernel that finds the digit holding the k-th
largest and narrows k. After 4 passes the prefix is the exact threshold;
a last pass writes the packed mask bits (key >= threshold key: ties kept).
Reads 5 x 4 B per entry, writes 1/8 B; no sort, no copy of the scores.
8-bit digits balance the number of passes (each reads the scores again)
against tl.histogram's cost per entry, which grows with the bin count (a
warp ballot per bit of the bin index, a popcount per bin owned by a lane):
11-bit digits would save a pass but make each pass compute-bound. The split
is a reasoned guess until measured on a GPU; it is one constant (RADIX_BITS,
any divisor of 32).

clip_grad_norm_'s masked norms: one program per chunk reads the gradient and
its mask bits once and writes the chunk's sum of squares (fp32 lanes, fp64
result); the host adds the chunks of each tensor. No masked copy.

Tuning: on a GPU, BLOCK and num_warps of the update are picked per kernel
variant and device the first time it runs, by timing a few configurations on
a scratch tensor (the update is in place, so the caller's tensors cannot be
used). Under Triton's interpreter (TRITON_INTERPRET=1 set before this module
is imported: CPU tensors only, for tests) one configuration is used, and
fp32 -> bf16 rounding is done on the bits because the interpreter truncates.
"""
import contextlib

import torch
import triton
import triton.language as tl

from .. import param_state, selection
from . import reference

NAME = "triton"
if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
    raise ImportError(f"triton {triton.__version__} is installed; this backend needs triton >= 3.6")
# Kernels defined now are interpreted for good if TRITON_INTERPRET was set at import.
_INTERPRETED = bool(triton.knobs.runtime.interpret)

_ROUND_BF16_BY_HAND = tl.constexpr(_INTERPRETED)
# One program per chunk; the tables depend on CHUNK, so it is fixed per process.
_CHUNK = 8192 if _INTERPRETED else 65536
_INTERPRETER_CONFIG = (4096, 4)  # (BLOCK, num_warps)
_GPU_CONFIGS = ((1024, 4), (2048, 8), (4096, 8))
_SELECT_CONFIG = _INTERPRETER_CONFIG if _INTERPRETED else (4096, 8)
_ALIGN = 16  # bytes; every tensor handed to a kernel starts on this boundary (vector loads)

# Columns of a table row (int64). The first two are shared by all kernels.
NUMEL, FIRST_CHUNK = tl.constexpr(0), tl.constexpr(1)
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, SCORE, MASK_BITS, RESET = (tl.constexpr(i) for i in range(2, 9))
UPDATE_FIELDS = tl.constexpr(9)
SELECT_SCORE, SELECT_OUT = tl.constexpr(2), tl.constexpr(3)
SELECT_FIELDS = tl.constexpr(4)
NORM_GRAD, NORM_BITS = tl.constexpr(2), tl.constexpr(3)
NORM_FIELDS = tl.constexpr(4)

# Mask modes of the update kernel.
NO_MASK, MASK_GRAD, MASK_FREEZE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

RADIX_BITS = tl.constexpr(8)
BINS = tl.constexpr(1 << RADIX_BITS.value)
PASSES = 32 // RADIX_BITS.value  # 32-bit keys

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def unavailable_reason(device: torch.device):
    """None on CUDA devices (and on the CPU under TRITON_INTERPRET=1), else why not."""
    if device.type == "cuda":
        if _INTERPRETED:
            return ("TRITON_INTERPRET=1 was set when the Triton kernels were defined; the interpreter "
                    "runs on CPU tensors only")
        if not torch.cuda.is_available():
            return "this torch sees no CUDA device"
        return None
    if device.type == "cpu":
        if _INTERPRETED:
            return None
        return ("Triton kernels need a GPU; on CPU tensors they run only through Triton's interpreter "
                "(a test tool: set TRITON_INTERPRET=1 before dps_fast.backends.triton_backend is imported)")
    return f"Triton kernels run on CUDA devices, not on {device.type}"


# ----- kernels ----------------------------------------------------------------------------

@triton.jit
def _chunk(rows_ptr, owners_ptr, FIELDS: tl.constexpr, CHUNK: tl.constexpr):
    """This program's tensor, its table row, and the first entry and length of its chunk."""
    chunk = tl.program_id(0)
    tensor = tl.load(owners_ptr + chunk)
    row = rows_ptr + tensor * FIELDS
    start = (chunk - tl.load(row + FIRST_CHUNK)) * CHUNK
    length = tl.minimum(tl.load(row + NUMEL) - start, CHUNK).to(tl.int32)
    return tensor, row, start, length


@triton.jit
def _address(row, field, dtype: tl.constexpr, offset):
    """The tensor address stored in `field` of `row`, as a `dtype` pointer, moved by `offset`
    elements (64-bit; everything after it indexes within a chunk in 32 bits)."""
    ptr = tl.load(row + field).to(tl.pointer_type(dtype))
    return tl.multiple_of(ptr, 16) + offset  # 16 = _ALIGN, which the host ensures


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


@triton.jit
def _update_kernel(rows_ptr, owners_ptr, coefs_ptr, inv_scale_ptr, found_inf_ptr, grad_coef_ptr,
                   decay, lerp_weight, beta2, one_minus_beta2, eps,
                   PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, SCORED: tl.constexpr,
                   MASK_MODE: tl.constexpr, HAS_INV_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                   HAS_GRAD_COEF: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    found_inf = 0.0
    if HAS_FOUND_INF:
        found_inf = tl.load(found_inf_ptr)
    if found_inf == 0:  # a step the GradScaler skips writes nothing
        tensor, row, start, length = _chunk(rows_ptr, owners_ptr, UPDATE_FIELDS, CHUNK)
        inv_scale = 1.0
        if HAS_INV_SCALE:
            inv_scale = tl.load(inv_scale_ptr).to(tl.float32)
        grad_coef = 1.0
        if HAS_GRAD_COEF:
            grad_coef = tl.load(grad_coef_ptr).to(tl.float32)
        # Score and mask addresses are 0 when absent; only SCORED / MASK_MODE kernels use them.
        ptrs = (_address(row, PARAM, PARAM_DTYPE, start), _address(row, GRAD, GRAD_DTYPE, start),
                _address(row, EXP_AVG, tl.float32, start), _address(row, EXP_AVG_SQ, tl.float32, start),
                _address(row, SCORE, tl.float32, start), _address(row, MASK_BITS, tl.uint8, start // 8))
        scalars = (inv_scale, grad_coef, decay, lerp_weight, beta2, one_minus_beta2, eps,
                   tl.load(coefs_ptr + 2 * tensor), tl.load(coefs_ptr + 2 * tensor + 1))
        keep_scores = tl.load(row + RESET) == 0
        # Whole blocks, then the tail: bounds divisible by BLOCK let loads and stores vectorise.
        whole = length // BLOCK * BLOCK
        _update_span(0, whole, keep_scores, ptrs, scalars, PARAM_DTYPE, SCORED, MASK_MODE, BLOCK)
        _update_span(whole, length, keep_scores, ptrs, scalars, PARAM_DTYPE, SCORED, MASK_MODE, BLOCK)


@triton.jit
def _update_span(first, last, keep_scores, ptrs, scalars, PARAM_DTYPE: tl.constexpr, SCORED: tl.constexpr,
                 MASK_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Update entries [first, last) of a chunk, BLOCK at a time."""
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, score_ptr, bits_ptr = ptrs
    inv_scale, grad_coef, decay, lerp_weight, beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt = scalars
    old_scores_last = tl.where(keep_scores, last, first)  # a reset does not read the old scores
    for block in range(first, last, BLOCK):
        idx = block + tl.arange(0, BLOCK)
        live = idx < last
        grad = tl.load(grad_ptr + idx, mask=live, other=0.0).to(tl.float32) * inv_scale
        if SCORED:  # the unclipped gradient
            score = tl.load(score_ptr + idx, mask=idx < old_scores_last, other=0.0)
            tl.store(score_ptr + idx, score + grad * grad, mask=live)
        grad = grad * grad_coef
        write = live
        if MASK_MODE != NO_MASK:  # chunks start on a multiple of 8 entries: bit idx % 8 of byte idx // 8
            kept = ((tl.load(bits_ptr + (idx >> 3), mask=live, other=0).to(tl.int32) >> (idx & 7)) & 1) != 0
            if MASK_MODE == MASK_GRAD:  # grad * mask, as the reference: an inf masked out gives NaN
                grad = grad * kept.to(tl.float32)
            else:
                write = live & kept
        param = tl.load(param_ptr + idx, mask=live, other=0.0).to(tl.float32)
        exp_avg = tl.load(exp_avg_ptr + idx, mask=live, other=0.0)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + idx, mask=live, other=0.0)
        param, exp_avg, exp_avg_sq = _adamw(param, grad, exp_avg, exp_avg_sq, decay, lerp_weight, beta2,
                                            one_minus_beta2, eps, neg_step_size, bc2_sqrt)
        tl.store(param_ptr + idx, _round(param, PARAM_DTYPE), mask=write)
        tl.store(exp_avg_ptr + idx, exp_avg, mask=write)
        tl.store(exp_avg_sq_ptr + idx, exp_avg_sq, mask=write)


@triton.jit
def _order_key(score):
    """The order keys of dps_fast.selection: uint32 keys whose unsigned order is the float
    order of `score`, with -0.0 as +0.0 and NaN as -inf."""
    score = tl.where(score != score, float("-inf"), tl.where(score == 0.0, 0.0, score))
    bits = score.to(tl.uint32, bitcast=True)
    # Negative floats order backwards: flip all their bits; positive ones go above them.
    return bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000)


@triton.jit
def _histogram_kernel(rows_ptr, owners_ptr, state_ptr, hist_ptr, PASS: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Per tensor: how many keys matching the prefix found so far have each value of digit PASS."""
    tensor, row, start, length = _chunk(rows_ptr, owners_ptr, SELECT_FIELDS, CHUNK)
    score_ptr = _address(row, SELECT_SCORE, tl.float32, start)
    prefix = tl.load(state_ptr + 2 * tensor).to(tl.uint32)
    whole = length // BLOCK * BLOCK  # whole blocks, then the tail (see _update_kernel)
    counts = _histogram_span(0, whole, score_ptr, prefix, tl.zeros([BINS], dtype=tl.int32), PASS, BLOCK)
    counts = _histogram_span(whole, length, score_ptr, prefix, counts, PASS, BLOCK)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + tensor * BINS + bins, counts.to(tl.int64), mask=counts > 0)


@triton.jit
def _histogram_span(first, last, score_ptr, prefix, counts, PASS: tl.constexpr, BLOCK: tl.constexpr):
    for block in range(first, last, BLOCK):
        idx = block + tl.arange(0, BLOCK)
        live = idx < last
        key = _order_key(tl.load(score_ptr + idx, mask=live, other=0.0))
        if PASS > 0:
            live = live & ((key >> (32 - RADIX_BITS * PASS)) == prefix)
        digit = ((key >> (32 - RADIX_BITS * (PASS + 1))) & (BINS - 1)).to(tl.int32)
        counts += tl.histogram(digit, BINS, mask=live)
    return counts


@triton.jit
def _narrow_kernel(hist_ptr, state_ptr):
    """Per tensor: append the digit of the k-th largest key to the prefix; k becomes its rank
    among the keys with that prefix."""
    tensor = tl.program_id(0)
    descending = (BINS - 1) - tl.arange(0, BINS)
    counts = tl.load(hist_ptr + tensor * BINS + descending)
    k = tl.load(state_ptr + 2 * tensor + 1)
    above = tl.cumsum(counts, 0) < k  # digits whose keys all rank above the k-th
    digit = (BINS - 1) - tl.sum(above.to(tl.int32), 0)
    tl.store(state_ptr + 2 * tensor + 1, k - tl.sum(tl.where(above, counts, 0), 0))
    tl.store(state_ptr + 2 * tensor, tl.load(state_ptr + 2 * tensor) * BINS + digit)


@triton.jit
def _pack_kernel(rows_ptr, owners_ptr, state_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Bit i % 8 of byte i // 8 := score[i] >= threshold (ties kept); bits past numel are 0."""
    tensor, row, start, length = _chunk(rows_ptr, owners_ptr, SELECT_FIELDS, CHUNK)
    score_ptr = _address(row, SELECT_SCORE, tl.float32, start)
    out_ptr = _address(row, SELECT_OUT, tl.uint8, start // 8)
    threshold = tl.load(state_ptr + 2 * tensor).to(tl.uint32)
    whole = length // BLOCK * BLOCK  # whole blocks, then the tail (see _update_kernel)
    _pack_span(0, whole, score_ptr, out_ptr, threshold, BLOCK)
    _pack_span(whole, length, score_ptr, out_ptr, threshold, BLOCK)


@triton.jit
def _pack_span(first, last, score_ptr, out_ptr, threshold, BLOCK: tl.constexpr):
    byte_in_block = tl.arange(0, BLOCK // 8)
    bit = tl.arange(0, 8)
    for block in range(first, last, BLOCK):
        idx = block + byte_in_block[:, None] * 8 + bit[None, :]
        live = idx < last
        kept = live & (_order_key(tl.load(score_ptr + idx, mask=live, other=0.0)) >= threshold)
        byte = tl.sum(kept.to(tl.int32) << bit[None, :], axis=1)
        out = block // 8 + byte_in_block
        tl.store(out_ptr + out, byte.to(tl.uint8), mask=out * 8 < last)


@triton.jit
def _masked_norm_kernel(rows_ptr, owners_ptr, out_ptr, GRAD_DTYPE: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Per chunk: the sum of (g * mask bit)^2 over its entries (an inf masked out gives NaN,
    as grad * mask does); fp32 lanes of CHUNK / BLOCK terms, summed into an fp64 result."""
    tensor, row, start, length = _chunk(rows_ptr, owners_ptr, NORM_FIELDS, CHUNK)
    grad_ptr = _address(row, NORM_GRAD, GRAD_DTYPE, start)
    bits_ptr = _address(row, NORM_BITS, tl.uint8, start // 8)
    lanes = tl.zeros([BLOCK], dtype=tl.float32)
    for block in range(0, length, BLOCK):
        idx = block + tl.arange(0, BLOCK)
        live = idx < length
        grad = tl.load(grad_ptr + idx, mask=live, other=0.0).to(tl.float32)
        kept = (tl.load(bits_ptr + (idx >> 3), mask=live, other=0).to(tl.int32) >> (idx & 7)) & 1
        masked = grad * kept.to(tl.float32)
        lanes += masked * masked
    tl.store(out_ptr + tl.program_id(0), tl.sum(lanes, 0).to(tl.float64))


# ----- host side ---------------------------------------------------------------------------

def _on(device):
    """Launch on `device` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _addressable(tensors, copy_back=None):
    """`tensors` (a list, or None) as tensors a kernel can address directly: contiguous and
    16-byte aligned, else copies. Copies of tensors the kernel writes go in `copy_back`."""
    if tensors is None:
        return None
    out = []
    for tensor in tensors:
        if not (tensor.is_contiguous() and tensor.data_ptr() % _ALIGN == 0):
            copy = tensor.clone(memory_format=torch.contiguous_format)
            if copy_back is not None:
                copy_back.append((tensor, copy))
            tensor = copy
        out.append(tensor)
    return out


def _upload(device, fields, numels, floats=(), extra=()):
    """One int64 device buffer: a row [numel, first chunk, *fields] per tensor, the owning
    tensor of each chunk, `extra` int64 values, then `floats` as fp32. Returns the views
    (rows, owners, extra, floats) and the number of chunks."""
    numels = torch.tensor(numels, dtype=torch.int64)
    chunks = (numels + _CHUNK - 1) // _CHUNK
    first = torch.cumsum(chunks, 0) - chunks
    rows = torch.cat([numels[:, None], first[:, None], torch.tensor(fields, dtype=torch.int64)], 1)
    owners = torch.repeat_interleave(torch.arange(len(numels)), chunks)
    floats = torch.tensor(floats, dtype=torch.float32)
    parts = [rows.reshape(-1), owners, torch.tensor(extra, dtype=torch.int64), floats]
    # Every section starts on a 16-byte boundary: Triton specialises pointer arguments on
    # that, so sections aligned by chance would compile a kernel per tensor count's parity.
    padded = [torch.cat([part, part.new_zeros(-part.numel() % (16 // part.element_size()))]).view(torch.int64)
              for part in parts]
    table = torch.cat(padded)
    if device.type == "cuda":  # from pageable memory a "non-blocking" copy may wait for the stream
        table = table.pin_memory()
    views = table.to(device, non_blocking=True).split([part.numel() for part in padded])
    views = [view.view(part.dtype)[: part.numel()] for view, part in zip(views, parts)]
    return views, len(owners)


def _scalar(value, device):
    return None if value is None else value.reshape(()).to(device, non_blocking=True)


def update(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
           grad_coef=None, scores=None, reset_scores=None, masks=None, freeze=False,
           inv_scale=None, found_inf=None):
    """Update every tensor of one group in place; semantics of reference.update (which
    updates the float64 parameters, whose state is float64: dps_fast.param_state)."""
    param_state.check_update(params, grads, exp_avgs, exp_avg_sqs, scores, masks)
    wide = [i for i, param in enumerate(params) if param.dtype == torch.float64]
    if wide:
        def pick(values, indices):
            return None if values is None else [values[i] for i in indices]

        reference.update(pick(params, wide), pick(grads, wide), pick(exp_avgs, wide), pick(exp_avg_sqs, wide),
                         pick(steps, wide), lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         grad_coef=grad_coef, scores=pick(scores, wide), reset_scores=pick(reset_scores, wide),
                         masks=pick(masks, wide), freeze=freeze, inv_scale=inv_scale, found_inf=found_inf)
    live = [i for i, param in enumerate(params) if param.numel() and param.dtype != torch.float64]
    if not live:
        return
    lr = float(lr)
    device = params[live[0]].device
    mask_mode = (NO_MASK if masks is None else MASK_FREEZE if freeze else MASK_GRAD).value
    hyper = dict(decay=1 - lr * weight_decay, lerp_weight=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
                 eps=eps)
    hyper = {name: float(value) for name, value in hyper.items()}
    scalars = dict(inv_scale=_scalar(inv_scale, device), found_inf=_scalar(found_inf, device),
                   grad_coef=_scalar(grad_coef, device))
    by_dtypes = {}  # one launch per (param dtype, grad dtype): the kernel's pointer types
    for i in live:
        by_dtypes.setdefault((params[i].dtype, grads[i].dtype), []).append(i)
    for (param_dtype, grad_dtype), indices in by_dtypes.items():
        def pick(values):
            return None if values is None else [values[i] for i in indices]

        # The table holds addresses only: every tensor it names, copies included, stays
        # referenced here until the launch is queued (the tuning of a first call allocates).
        copy_back = []
        ready = dict(params=_addressable(pick(params), copy_back), grads=_addressable(pick(grads)),
                     exp_avgs=_addressable(pick(exp_avgs), copy_back),
                     exp_avg_sqs=_addressable(pick(exp_avg_sqs), copy_back),
                     scores=_addressable(pick(scores), copy_back), masks=_addressable(pick(masks)))
        tables = _update_tables(device, lr, beta1, beta2, steps=pick(steps), reset_scores=pick(reset_scores),
                                **ready)
        variant = (param_dtype, grad_dtype, scores is not None, mask_mode)
        with _on(device):
            _launch_update(tables, variant, hyper, scalars, _update_config(device, variant))
        for tensor, copy in copy_back:
            tensor.copy_(copy)


def _update_tables(device, lr, beta1, beta2, params, grads, exp_avgs, exp_avg_sqs, scores, reset_scores, masks,
                   steps):
    """The update kernel's tables (see _upload): addresses, reset flags, bias corrections."""
    def address(tensors, i):
        return 0 if tensors is None else tensors[i].data_ptr()

    fields = [[params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
               address(scores, i), address(masks, i), int(scores is not None and reset_scores[i])]
              for i in range(len(params))]
    coefs = []
    for step in steps:  # bias corrections, computed in double as the reference does
        coefs += [-lr / (1 - beta1**step), (1 - beta2**step) ** 0.5]
    return _upload(device, fields, [p.numel() for p in params], floats=coefs)


def _launch_update(tables, variant, hyper, scalars, config):
    (rows, owners, _, coefs), n_chunks = tables
    param_dtype, grad_dtype, scored, mask_mode = variant
    block, num_warps = config
    _update_kernel[(n_chunks,)](
        rows, owners, coefs, scalars["inv_scale"], scalars["found_inf"], scalars["grad_coef"], **hyper,
        PARAM_DTYPE=_TL_DTYPES[param_dtype], GRAD_DTYPE=_TL_DTYPES[grad_dtype], SCORED=scored,
        MASK_MODE=mask_mode, HAS_INV_SCALE=scalars["inv_scale"] is not None,
        HAS_FOUND_INF=scalars["found_inf"] is not None, HAS_GRAD_COEF=scalars["grad_coef"] is not None,
        CHUNK=_CHUNK, BLOCK=block, num_warps=num_warps)


_tuned = {}


def _update_config(device, variant):
    """(BLOCK, num_warps) for an update kernel variant: on a GPU the fastest of _GPU_CONFIGS
    on a scratch tensor of 8M entries, timed once per variant and device."""
    if _INTERPRETED:
        return _INTERPRETER_CONFIG
    key = (device, variant)
    if key not in _tuned:
        from triton.testing import do_bench

        param_dtype, grad_dtype, scored, mask_mode = variant
        n = 1 << 23  # 8M entries, past the L2 cache

        def zeros(dtype=torch.float32, numel=n):
            return [torch.zeros(numel, dtype=dtype, device=device)]

        # held until the timing is done: the table keeps only their addresses
        scratch = dict(params=zeros(param_dtype), grads=zeros(grad_dtype), exp_avgs=zeros(), exp_avg_sqs=zeros(),
                       scores=zeros() if scored else None,
                       masks=None if mask_mode == NO_MASK.value else zeros(torch.uint8, n // 8))
        tables = _update_tables(device, 1e-3, 0.9, 0.999, reset_scores=[False], steps=[1], **scratch)
        hyper = dict(decay=1.0, lerp_weight=0.1, beta2=0.999, one_minus_beta2=0.001, eps=1e-8)
        scalars = dict(inv_scale=None, found_inf=None, grad_coef=None)
        with _on(device):
            times = [do_bench(lambda: _launch_update(tables, variant, hyper, scalars, config), warmup=5, rep=20)
                     for config in _GPU_CONFIGS]
        _tuned[key] = _GPU_CONFIGS[times.index(min(times))]
    return _tuned[key]


def masked_norms(grads, masks):
    """1-D fp32 tensor: the L2 norm of each grad * its packed mask; semantics of
    reference.masked_norms (summed in fp32 per lane and fp64 across chunks)."""
    param_state.check_masks(grads, masks)
    norms = [None] * len(grads)
    by_dtype = {}
    for i, grad in enumerate(grads):
        if grad.numel() == 0:
            norms[i] = torch.zeros((), device=grad.device)
        else:
            by_dtype.setdefault(grad.dtype, []).append(i)
    block, num_warps = _SELECT_CONFIG
    for dtype, indices in by_dtype.items():
        device = grads[indices[0]].device
        ready = _addressable([grads[i] for i in indices])
        bits = _addressable([masks[i] for i in indices])
        (rows, owners, _, _), n_chunks = _upload(device, [[g.data_ptr(), b.data_ptr()] for g, b in zip(ready, bits)],
                                                 [g.numel() for g in ready])
        partial = torch.empty(n_chunks, dtype=torch.float64, device=device)
        with _on(device):
            _masked_norm_kernel[(n_chunks,)](rows, owners, partial, GRAD_DTYPE=_TL_DTYPES[dtype], CHUNK=_CHUNK,
                                             BLOCK=block, num_warps=num_warps)
        sums = torch.zeros(len(indices), dtype=torch.float64, device=device).index_add_(0, owners, partial)
        for i, norm in zip(indices, sums.sqrt().float()):
            norms[i] = norm
    return torch.stack(norms)


def select_masks(scores, sparsity):
    """One packed mask per score tensor (see dps_fast.selection); semantics of reference.select_masks."""
    masks = [torch.empty(selection.packed_size(score.numel()), dtype=torch.uint8, device=score.device)
             for score in scores]
    live = [i for i, score in enumerate(scores) if score.numel()]
    if not live:
        return masks
    device = scores[live[0]].device
    ready = _addressable([scores[i].float() for i in live])
    numels = [score.numel() for score in ready]
    state = []  # per tensor: (threshold key prefix so far, rank k of the threshold among matching keys)
    for numel in numels:
        state += [0, selection.kept_count(numel, sparsity)]
    (rows, owners, state, _), n_chunks = _upload(
        device, [[score.data_ptr(), masks[i].data_ptr()] for i, score in zip(live, ready)], numels, extra=state)
    hist = torch.zeros(PASSES, len(live), BINS, dtype=torch.int64, device=device)
    block, num_warps = _SELECT_CONFIG
    with _on(device):
        for pass_ in range(PASSES):
            _histogram_kernel[(n_chunks,)](rows, owners, state, hist[pass_], PASS=pass_, CHUNK=_CHUNK,
                                           BLOCK=block, num_warps=num_warps)
            _narrow_kernel[(len(live),)](hist[pass_], state, num_warps=1)
        _pack_kernel[(n_chunks,)](rows, owners, state, CHUNK=_CHUNK, BLOCK=block, num_warps=num_warps)
    return masks
