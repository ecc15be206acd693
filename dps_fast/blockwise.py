"""Block-wise 8-bit quantization of AdamW's moments (state_dtype="8bit"): the two
code maps and the two functions the update applies, in plain PyTorch. This is
the specification that the compiled and Triton kernels are to repeat to the bit
(they do not store 8-bit state yet).

Blocks. A moment tensor's entries, in row-major order (the memory order of a
contiguous tensor), are cut into blocks of BLOCK = 256 (the last one shorter).
A block is stored as one fp32 scale s, the largest |x| of its entries (its
absmax), and one uint8 code per entry:

    dequantize:  x = MAP[code] * s                  (one fp32 product)
    quantize:    code = nearest(x / s)              (an IEEE fp32 division, not x * (1 / s))

Maps (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR
2022): the dynamic ("tree") maps of bitsandbytes' create_dynamic_map, which
torchao's AdamW8bit uses too: SIGNED for exp_avg, UNSIGNED for exp_avg_sq.
Each of the 7 decades [10^-k/10, 10^-k) (k = 0..6) is cut into equal parts
whose midpoints are codes: 1, 2, 4, ..., 64 parts (signed, each with its
negative) or 2, 4, ..., 128 parts (unsigned); 0 and 1 complete the 256. So
a code keeps about 2 significant digits near the absmax and 7 decades of
dynamic range below it. The values are computed in double and rounded once
to fp32 (`_dynamic_map`): within 2e-7 (relative, 2 ulps) of bitsandbytes' fp32
construction, and independent of torch's linspace.

Nearest code (Note [nearest code]). MIDPOINTS[k] = (MAP[k] + MAP[k + 1]) / 2,
rounded to fp32 (k = 0..254), and

    code = the number of midpoints m with m < x / s

so a value exactly at a midpoint takes the lower code, the smaller of its two
neighbours (toward -inf): this is the one tie rule. (It decides too where
rounding a true midpoint to fp32 moved it onto a value a little nearer the
upper code; no other value lies between a midpoint and its fp32 rounding.)
A kernel finds the code with a branchless binary search of 8 compares over
the midpoints padded to 256 with +inf:

    c = 0; for step in 128, 64, ..., 1: if MIDPOINTS[c + step - 1] < x: c += step

No positive value takes the zero code of the unsigned map (exp_avg_sq): one
below half the smallest positive code (about 1.6e-7 of its block's absmax)
takes that smallest code instead. Read back as 0, it would make AdamW's step
lr * m / eps with m still nonzero (m has its own block), a jump of thousands
of learning rates; read back a little too large, it only shortens the step.

Special blocks:
- s == 0 (every entry 0 or -0): the entries quantize as x / s := 0, to ZERO_CODE
  (whose value is 0), and dequantize to +0 (MAP[code] * 0), never NaN.
- a NaN or +-inf entry: s is NaN (not the absmax), x / s is NaN, which no
  midpoint is below: code 0. Every entry of the block then dequantizes to NaN.
  A non-finite moment spoils its block (256 entries), not just its entry; a
  GradScaler's skipped steps never reach the state (dps_fast.amp).
"""
import torch

BLOCK = 256  # entries per block scale


def _dynamic_map(signed):
    """The 256 values of the signed or unsigned dynamic map, sorted, in fp32."""
    values = [0.0, 1.0]
    for decade in range(7):  # 10^(decade - 6) * the midpoints of `parts` equal parts of [0.1, 1]
        parts = 2 ** decade if signed else 2 ** (decade + 1)
        for j in range(parts):
            value = 10.0 ** (decade - 6) * (0.1 + 0.9 * (2 * j + 1) / (2 * parts))
            values += [value, -value] if signed else [value]
    return torch.tensor(sorted(values), dtype=torch.float32)


MAPS = {True: _dynamic_map(True), False: _dynamic_map(False)}  # signed (exp_avg), unsigned (exp_avg_sq)
MIDPOINTS = {signed: (values[:-1] + values[1:]) / 2 for signed, values in MAPS.items()}
ZERO_CODE = {signed: int((values == 0).nonzero()) for signed, values in MAPS.items()}  # 127 and 0


def num_blocks(numel):
    """The number of block scales of a tensor of `numel` entries."""
    return -(-numel // BLOCK)


def blocks_of(x):
    """x's entries in row-major order as rows of BLOCK, the last row padded with zeros."""
    rows = x.new_zeros(num_blocks(x.numel()), BLOCK)
    rows.view(-1)[:x.numel()] = x.reshape(-1)
    return rows


def entries_of(rows, shape):
    """The tensor of `shape` whose blocks_of are `rows` (its padding dropped)."""
    return rows.view(-1)[:shape.numel()].view(shape)


def scales_of(rows):
    """The scale of each block of `rows` (blocks_of's): its largest |entry|, NaN where an
    entry is not finite."""
    absmax = rows.abs().amax(dim=1)
    return torch.where(absmax.isfinite(), absmax, torch.nan)


def quantize(x, signed, scales=None):
    """(codes, scales) of fp32 tensor `x`: uint8 codes of x's shape (contiguous) and
    the fp32 scales of its blocks, 1-D of num_blocks(x.numel()): their absmax, or the
    `scales` given (each at least its block's absmax, or NaN)."""
    rows = blocks_of(x)
    if scales is None:
        scales = scales_of(rows)
    normal = torch.where(scales[:, None] == 0, 0.0, rows / scales[:, None])
    codes = torch.searchsorted(MIDPOINTS[signed].to(x.device), normal)  # midpoints < normal: ties go down
    codes = codes.masked_fill(normal.isnan(), 0)  # (torch's search would put NaN last)
    if not signed:  # a positive value never reads back as 0
        codes = torch.where((normal > 0) & (codes == ZERO_CODE[signed]), ZERO_CODE[signed] + 1, codes)
    return entries_of(codes.to(torch.uint8), x.shape), scales


def dequantize(codes, scales, signed):
    """The fp32 tensor (codes' shape) that uint8 `codes` and their blocks' fp32 `scales` stand for."""
    rows = MAPS[signed].to(codes.device)[blocks_of(codes).long()] * scales[:, None]
    return entries_of(rows, codes.shape)


def zero_codes(like, signed):
    """The codes of a zero tensor of `like`'s shape and strides (their scales are zeros)."""
    return torch.full_like(like, ZERO_CODE[signed], dtype=torch.uint8)
