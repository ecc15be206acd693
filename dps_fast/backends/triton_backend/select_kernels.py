"""The per-tensor selection as Triton kernels: the k-th largest score of each
tensor by a radix select over the order keys, in the words of
csrc/dps_select.h: PASSES passes of a histogram (tl.histogram of one digit
over the candidates: BINS bins per tensor, summed with atomics) and a narrow
(one program per tensor), then a pack of the mask bits. Reads
(PASSES + 1) x 4 B per entry, writes 1/8 B; no sort, no copy of the scores.
The digit plan is dps_fast.selection's (csrc/dps_select.h, Note [digit plan]).
"""
import torch
import triton
import triton.language as tl

from ... import param_state, selection
from .tables import CHUNK, UNTUNED_CONFIG, address, addressable, chunk_of_program, launching_on, upload

# Columns of a row of the selection's table, after NUMEL and FIRST_CHUNK (Note [table layout]).
SCORE, MASK_BITS = tl.constexpr(2), tl.constexpr(3)
FIELDS = tl.constexpr(4)

DIGIT_BITS = tl.constexpr(selection.DIGIT_BITS)
BINS = tl.constexpr(selection.BINS)
KEY_BITS = tl.constexpr(selection.KEY_BITS)


@triton.jit
def order_key(score):
    """The order keys of dps_fast.selection: uint32 keys whose unsigned order is the float
    order of `score`, with -0.0 as +0.0 and NaN as -inf."""
    score = tl.where(score != score, float("-inf"), tl.where(score == 0.0, 0.0, score))
    bits = score.to(tl.uint32, bitcast=True)
    # Negative floats order backwards: flip all their bits; positive ones go above them.
    return bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000)


@triton.jit
def _histogram_kernel(rows_ptr, owners_ptr, state_ptr, hist_ptr, PASS: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Per tensor: how many candidates (keys matching the prefix found so far) have each
    value of digit PASS."""
    tensor, row, start, length = chunk_of_program(rows_ptr, owners_ptr, FIELDS, CHUNK)
    score_ptr = address(row, SCORE, tl.float32, start)
    prefix = tl.load(state_ptr + 2 * tensor).to(tl.uint32)
    whole = length // BLOCK * BLOCK  # Note [whole blocks, then the tail]
    counts = _histogram_span(0, whole, score_ptr, prefix, tl.zeros([BINS], dtype=tl.int32), PASS, BLOCK)
    counts = _histogram_span(whole, length, score_ptr, prefix, counts, PASS, BLOCK)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + tensor * BINS + bins, counts.to(tl.int64), mask=counts > 0)


@triton.jit
def _histogram_span(first, last, score_ptr, prefix, counts, PASS: tl.constexpr, BLOCK: tl.constexpr):
    for block in range(first, last, BLOCK):
        idx = block + tl.arange(0, BLOCK)
        live = idx < last
        key = order_key(tl.load(score_ptr + idx, mask=live, other=0.0))
        if PASS > 0:
            live = live & ((key >> (KEY_BITS - DIGIT_BITS * PASS)) == prefix)
        digit = ((key >> (KEY_BITS - DIGIT_BITS * (PASS + 1))) & (BINS - 1)).to(tl.int32)
        counts += tl.histogram(digit, BINS, mask=live)
    return counts


@triton.jit
def _narrow_kernel(hist_ptr, state_ptr):
    """Per tensor: append the digit of the rank-th largest candidate to the prefix; rank
    becomes its rank among the candidates with that digit."""
    tensor = tl.program_id(0)
    descending = (BINS - 1) - tl.arange(0, BINS)
    counts = tl.load(hist_ptr + tensor * BINS + descending)
    rank = tl.load(state_ptr + 2 * tensor + 1)
    above = tl.cumsum(counts, 0) < rank  # digits whose candidates all rank above the wanted one
    digit = (BINS - 1) - tl.sum(above.to(tl.int32), 0)
    tl.store(state_ptr + 2 * tensor + 1, rank - tl.sum(tl.where(above, counts, 0), 0))
    tl.store(state_ptr + 2 * tensor, tl.load(state_ptr + 2 * tensor) * BINS + digit)


@triton.jit
def _pack_kernel(rows_ptr, owners_ptr, state_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Bit i % 8 of byte i // 8 := order_key(score[i]) >= threshold key (ties kept); bits
    past numel are 0."""
    tensor, row, start, length = chunk_of_program(rows_ptr, owners_ptr, FIELDS, CHUNK)
    score_ptr = address(row, SCORE, tl.float32, start)
    out_ptr = address(row, MASK_BITS, tl.uint8, start // 8)
    threshold = tl.load(state_ptr + 2 * tensor).to(tl.uint32)
    whole = length // BLOCK * BLOCK  # Note [whole blocks, then the tail]
    _pack_span(0, whole, score_ptr, out_ptr, threshold, BLOCK)
    _pack_span(whole, length, score_ptr, out_ptr, threshold, BLOCK)


@triton.jit
def _pack_span(first, last, score_ptr, out_ptr, threshold, BLOCK: tl.constexpr):
    byte_in_block = tl.arange(0, BLOCK // 8)
    bit = tl.arange(0, 8)
    for block in range(first, last, BLOCK):
        idx = block + byte_in_block[:, None] * 8 + bit[None, :]
        live = idx < last
        kept = live & (order_key(tl.load(score_ptr + idx, mask=live, other=0.0)) >= threshold)
        byte = tl.sum(kept.to(tl.int32) << bit[None, :], axis=1)
        out = block // 8 + byte_in_block
        tl.store(out_ptr + out, byte.to(tl.uint8), mask=out * 8 < last)


def select_masks(scores, sparsity):
    """One packed mask per score tensor (see dps_fast.selection); semantics of reference.select_masks."""
    if scores:
        param_state.check_device(scores, scores[0].device, "scores")
    masks = [torch.empty(selection.packed_size(score.numel()), dtype=torch.uint8, device=score.device)
             for score in scores]
    for batch in selection.batches(scores):  # bf16 scores converted a batch at a time
        live = [i for i in batch if scores[i].numel()]
        if live:
            _select_batch(scores, masks, live, sparsity)
    return masks


def _select_batch(scores, masks, live, sparsity):
    """masks[i] of scores[i] for every i in `live` (non-empty scores): one launch of each kernel."""
    device = scores[live[0]].device
    ready = addressable([scores[i].float() for i in live])
    numels = [score.numel() for score in ready]
    state = []  # per tensor: (prefix of the threshold key found so far, rank of the wanted key among the candidates)
    for numel in numels:
        state += [0, selection.kept_count(numel, sparsity)]
    (rows, owners, state, _), n_chunks = upload(
        device, [[score.data_ptr(), masks[i].data_ptr()] for i, score in zip(live, ready)], numels, extra=state)
    hist = torch.zeros(selection.PASSES, len(live), BINS, dtype=torch.int64, device=device)
    block, num_warps = UNTUNED_CONFIG
    with launching_on(device):
        for pass_ in range(selection.PASSES):
            _histogram_kernel[(n_chunks,)](rows, owners, state, hist[pass_], PASS=pass_, CHUNK=CHUNK,
                                           BLOCK=block, num_warps=num_warps)
            _narrow_kernel[(len(live),)](hist[pass_], state, num_warps=1)
        _pack_kernel[(n_chunks,)](rows, owners, state, CHUNK=CHUNK, BLOCK=block, num_warps=num_warps)
