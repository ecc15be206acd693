"""Stochastic rounding: where its random bits come from and how a value is
stored with them; the specification that csrc/dps_math.h and the Triton
kernels repeat to the bit.

Random bits. Every entry of a tensor gets, at each of the tensor's steps, two
32-bit words that are a pure function of (the parameter's seed, its AdamW step,
the entry's index in the whole tensor): nothing is drawn from torch's RNG, so
backends, thread counts, devices, shards (the global index) and resumed runs
(the seed and the step are in the state dict) draw the same bits. The host
derives a tensor's two stream keys once per step (`stream_keys`); each entry
then costs two hashes per stream (`entry_words`):

    word = mix32(mix32(key ^ (index >> 32)) ^ (index & 0xffffffff))

mix32 is the "lowbias32" integer finaliser (C. Wellons): a bijection of uint32
whose output bits pass as independent for rounding. Stream A feeds exp_avg
(its low 16 bits) and exp_avg_sq (high 16), stream B the score (low 16) and
the parameter (high 16).

Stores. `stochastic(x, dtype, r16)` rounds fp32 values to bf16 or fp16 so that
E[result] = x: the bits below the kept ones, read as a fraction of the kept
unit, are the probability of rounding up (away from zero). For bf16 that is
(bits(x) + r16) >> 16, with 16 random bits for 16 dropped ones: exactly
unbiased. For fp16 the 13 dropped bits of a normal value take r16 >> 3
(exact); below fp16's normal range more bits drop, and r16 is shifted left
to cover them (the low ones then never carry: a bias under 2^-16 of the unit).
NaN stays NaN and +-inf stays inf. bf16: a finite value never becomes inf
(where the carry would reach the inf exponent, the value rounded toward zero,
the largest bf16, is kept), even past the point where rounding to nearest
gives inf. fp16: from 65520 up (where rounding to nearest gives inf) the
result is inf; below it a value never rounds up to inf.
"""
import torch

MASK32 = 0xFFFFFFFF
STREAM_A, STREAM_B = 0x68E31DA4, 0xB5297A4D  # the two streams of a tensor's step


def _mul32(x, c):
    """(x * c) mod 2^32 for uint32 x (int or int64 tensor) and constant c, with no
    intermediate past 2^48 (int64 tensors must not overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """lowbias32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
    (uint32 arithmetic, on Python ints or int64 tensors holding uint32 values)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_keys(seed, step):
    """(key A, key B): the two streams of a tensor whose seed is `seed` at AdamW step `step`."""
    base = mix32((seed & MASK32) ^ mix32(step & MASK32))
    return mix32(base ^ STREAM_A), mix32(base ^ STREAM_B)


def entry_words(key, index):
    """The 32-bit words (int64 tensor) of the entries whose indices in the whole tensor are `index`."""
    return mix32(mix32(key ^ (index >> 32)) ^ (index & MASK32))


def stochastic(x, dtype, r16):
    """fp32 tensor `x` rounded stochastically to `dtype` (torch.bfloat16 or torch.float16)
    with 16 random bits per entry (`r16`, int64 in [0, 2^16))."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & MASK32
    sign, magnitude = u & 0x80000000, u & 0x7FFFFFFF
    if dtype == torch.bfloat16:
        up, down = (u + r16) >> 16, u >> 16
        overflow = (up & 0x7F80) == 0x7F80  # inf or NaN exponent
        bits = torch.where(x.isnan(), 0x7FC0, torch.where(overflow & x.isfinite(), down, up))
    elif dtype == torch.float16:
        exponent = magnitude >> 23
        # normal: fp16's 10 mantissa bits are fp32's top 10; the exponent is rebiased by 112
        normal_up = ((magnitude + (r16 >> 3)) >> 13) - (112 << 10)
        normal_down = (magnitude >> 13) - (112 << 10)
        # below 2^-14: the 24-bit significand (implicit one included) on fp16's 2^-24 grid
        drop = (126 - exponent).clamp(min=14, max=40)
        significand = (magnitude & 0x7FFFFF) | torch.where(exponent > 0, 0x800000, 0)
        noise = torch.where(drop <= 16, r16 >> (16 - drop).clamp(min=0), r16 << (drop - 16).clamp(min=0))
        small_up, small_down = (significand + noise) >> drop, significand >> drop
        up = torch.where(exponent < 113, small_up, normal_up)
        down = torch.where(exponent < 113, small_down, normal_down)
        # at or past 65520 rounding to nearest gives inf; below it, never round up to inf
        up = torch.where((up >= 0x7C00) & (magnitude < 0x477FF000), down, up)
        up = torch.where(magnitude >= 0x477FF000, 0x7C00, up)  # 65520 and above, inf included
        bits = torch.where(x.isnan(), 0x7E00, up) | (sign >> 16)  # NaN keeps its sign, as float_to_f16
    else:
        raise ValueError(f"stochastic rounding stores bf16 or fp16; got {dtype}")
    return bits.to(torch.uint16).view(dtype).view(x.shape)
