"""Per-tensor subnetwork selection: keep the k highest scores, ties kept.

This is the readable definition every backend's selection must reproduce
exactly: k = ceil(N * (1 - sparsity)), t = the k-th largest score of the
tensor, mask = score >= t (so the mask holds more than k entries when
scores tie at t).
"""
import math
from fractions import Fraction

import torch


def kept_count(numel: int, sparsity: float) -> int:
    """k = ceil(numel * (1 - sparsity)), computed on the decimal value of
    `sparsity` so that e.g. 10 entries at sparsity 0.3 keep exactly 7."""
    frozen = math.floor(numel * Fraction(repr(float(sparsity))))
    return numel - frozen


def threshold(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The k-th largest entry of `score` (a 0-dim tensor); `score` is non-empty."""
    flat = score.reshape(-1)
    k = kept_count(flat.numel(), sparsity)
    # kthvalue is a selection (no full sort); the k-th largest is the
    # (N - k + 1)-th smallest.
    return torch.kthvalue(flat, flat.numel() - k + 1).values


def select_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask of the entries kept for an exploitation stage."""
    if score.numel() == 0:
        return torch.ones_like(score, dtype=torch.bool)
    return score >= threshold(score, sparsity)


def mix_normalised_score(score: torch.Tensor, count: torch.Tensor, stage_steps: int) -> torch.Tensor:
    """DPS-Mix score: mean squared gradient over the steps an entry was kept,
    damped by exp(-count / T) for long stages (T >= 50), as published."""
    normalised = score / count.clamp(min=1.0)
    if stage_steps >= 50:
        normalised = normalised * torch.exp(-count / stage_steps)
    return normalised


# Masks are stored packed, 1 bit per entry, in every backend: entry i of the
# flattened tensor is bit (i % 8) of byte i // 8. One format means optimizer
# checkpoints move freely between backends.
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 tensor of ceil(numel / 8) bytes."""
    flat = mask.reshape(-1)
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8, device=mask.device)
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
