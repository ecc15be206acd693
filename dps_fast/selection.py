"""Per-tensor subnetwork selection: keep the k highest scores, ties kept.

This is the readable definition every backend's selection reproduces
exactly: k = ceil(N * (1 - sparsity)), t = the k-th largest score of the
tensor, mask = score >= t (so the mask holds more than k entries when
scores tie at t).

Scores are compared through their order key (`order_keys`), a 32-bit
unsigned integer per fp32 score that orders like the float. It is the one
vocabulary of every selection (the C++ and Triton `order_key`, in
csrc/dps_select.h and dps_fast/backends/triton_backend/select_kernels.py,
and dps_fast.distributed's radix select; csrc/dps_select.h names their
steps: histogram, narrow, pack; its Note [digit plan] says why the C++
kernels use 11/11/10-bit digits where the others use DIGIT_BITS):
  - a NaN score ranks as -inf: it is kept only when fewer than k entries
    rank above -inf (and then with every entry tied at the threshold), so a
    mask never holds fewer than k entries;
  - -0.0 ranks as +0.0 (they compare equal).
"""
import math
from fractions import Fraction

import torch

KEY_BITS = 32  # order keys are uint32 values (held in int64 tensors here)
# The digit plan of the Python and Triton radix selections (dps_fast.distributed, the Triton
# backend): 8-bit digits of the order key, most significant first; csrc/dps_select.h,
# Note [digit plan], says why the C++ kernels split it into 11, 11 and 10 bits.
DIGIT_BITS = 8
PASSES = KEY_BITS // DIGIT_BITS
BINS = 1 << DIGIT_BITS
_SIGN = 1 << 31
_ALL = (1 << 32) - 1


# A selection kernel reads fp32 scores: bf16 ones (state_dtype="bf16") are converted first, at most
# this many entries at a time, so that the copies of a stage boundary stay small (64 MB) however
# large the model (dps_fast.state_format).
CONVERSION_ENTRIES = 1 << 24


def batches(scores):
    """Lists of indices into `scores`, one selection call each: fp32 scores together (the
    kernels read them in place), others in runs of at most CONVERSION_ENTRIES entries (a
    larger tensor alone)."""
    fp32 = [i for i, score in enumerate(scores) if score.dtype == torch.float32]
    out, run, size = [fp32] if fp32 else [], [], 0
    for i, score in enumerate(scores):
        if score.dtype == torch.float32:
            continue
        if run and size + score.numel() > CONVERSION_ENTRIES:
            out.append(run)
            run, size = [], 0
        run.append(i)
        size += score.numel()
    return out + ([run] if run else [])


def kept_count(numel: int, sparsity: float) -> int:
    """k = ceil(numel * (1 - sparsity)), computed on the decimal value of
    `sparsity` so that e.g. 10 entries at sparsity 0.3 keep exactly 7."""
    frozen = math.floor(numel * Fraction(repr(float(sparsity))))
    return numel - frozen


def order_keys(score: torch.Tensor) -> torch.Tensor:
    """int64 tensor of the order keys (in [0, 2^32)) of fp32 `score`, same shape."""
    score = score.to(torch.float32)
    score = torch.where(score.isnan(), -math.inf, score)
    score = torch.where(score == 0, 0.0, score)  # -0.0 -> +0.0
    bits = score.view(torch.int32).to(torch.int64) & _ALL
    # negative floats order backwards: flip all their bits; non-negative ones go above them
    return torch.where(bits >= _SIGN, bits ^ _ALL, bits | _SIGN)


def key_to_score(key: int) -> float:
    """The fp32 value (as a Python float) whose order key is `key`."""
    bits = key & ~_SIGN if key & _SIGN else key ^ _ALL
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def threshold_key(score: torch.Tensor, sparsity: float) -> int:
    """The order key of the k-th largest entry of non-empty `score`."""
    keys = order_keys(score).reshape(-1)
    k = kept_count(keys.numel(), sparsity)
    # kthvalue is a selection (no full sort); the k-th largest is the (N - k + 1)-th smallest
    return int(torch.kthvalue(keys, keys.numel() - k + 1).values)


def threshold(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The k-th largest entry of non-empty `score` (a 0-dim fp32 tensor; -inf for a NaN)."""
    return torch.tensor(key_to_score(threshold_key(score, sparsity)), dtype=torch.float32)


def select_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask of the entries kept for an exploitation stage."""
    if score.numel() == 0:
        return torch.ones_like(score, dtype=torch.bool)
    return order_keys(score) >= threshold_key(score, sparsity)


def mix_normalised_score(score: torch.Tensor, count: torch.Tensor, stage_steps: int) -> torch.Tensor:
    """DPS-Mix score: mean squared gradient over the steps an entry was kept,
    damped by exp(-count / T) for long stages (T >= 50), as published."""
    normalised = score / count.clamp(min=1.0)
    if stage_steps >= 50:
        normalised = normalised * torch.exp(-count / stage_steps)
    return normalised


# Masks are stored packed, 1 bit per entry, in every backend: entry i of the
# flattened tensor is bit (i % 8) of byte i // 8; bits past the last entry
# are 0. One format means optimizer checkpoints move freely between backends.
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)


def packed_size(numel: int) -> int:
    """Bytes of the packed mask of a tensor of `numel` entries."""
    return (numel + 7) // 8


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> 1-D uint8 tensor of packed_size(numel) bytes."""
    flat = mask.reshape(-1)
    padded = torch.zeros(packed_size(flat.numel()) * 8, dtype=torch.uint8, device=mask.device)
    padded[: flat.numel()] = flat
    return (padded.view(-1, 8) * _BIT_WEIGHTS.to(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, shape) -> torch.Tensor:
    """uint8 tensor from pack_mask -> bool tensor of `shape`."""
    numel = math.prod(shape)
    # a lookup of each byte's 8 bools: one gather, about 4x faster than shifting and comparing
    unpacked = _byte_to_bools(bits.device).index_select(0, bits.int())
    return unpacked.reshape(-1)[:numel].reshape(shape)


_BYTE_TABLES = {}


def _byte_to_bools(device):
    """The 256 x 8 bool table whose row b holds the bits of byte b, lowest first."""
    if device not in _BYTE_TABLES:
        table = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _BYTE_TABLES[device] = table.bool().to(device)
    return _BYTE_TABLES[device]
