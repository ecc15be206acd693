"""The selection rule (dps_fast/selection.py): k, the order keys, the threshold, ties,
NaN scores, and the packed mask format every backend shares."""
import math

import pytest
import torch

from dps_fast import selection


@pytest.mark.parametrize("numel, sparsity, k", [(10, 0.3, 7), (10, 0.7, 3), (1, 0.99, 1), (0, 0.3, 0),
                                                (100, 0.0, 100), (7, 0.5, 4)])
def test_kept_count_is_ceil_of_the_decimal(numel, sparsity, k):
    assert selection.kept_count(numel, sparsity) == k == math.ceil(round(numel * (1 - sparsity), 9))


def test_order_keys_order_as_floats_with_nan_as_minus_inf():
    values = torch.tensor([-float("inf"), -2.5, -1e-30, 0.0, 1e-45, 1.0, 3.0e38, float("inf")])
    keys = selection.order_keys(values)
    assert keys.dtype == torch.int64 and (keys[1:] > keys[:-1]).all() and (keys >= 0).all() and (keys < 2**32).all()
    special = selection.order_keys(torch.tensor([float("nan"), -float("nan"), -0.0, 0.0, -float("inf")]))
    assert special[0] == special[1] == special[4]  # NaN (of either sign) ranks as -inf
    assert special[2] == special[3]  # -0.0 as +0.0
    for key, value in zip(keys.tolist(), values.tolist()):
        assert selection.key_to_score(key) == value


@pytest.mark.parametrize("seed", range(3))
def test_threshold_is_the_kth_largest_and_ties_are_kept(seed):
    generator = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 5, (101,), generator=generator).float()  # heavy ties
    for sparsity in (0.0, 0.3, 0.9):
        k = selection.kept_count(score.numel(), sparsity)
        want = torch.sort(score, descending=True).values[k - 1]
        assert selection.threshold(score, sparsity) == want
        mask = selection.select_mask(score, sparsity)
        assert torch.equal(mask, score >= want) and int(mask.sum()) >= k


def test_nan_scores_never_shrink_a_mask_below_k():
    score = torch.rand(100, generator=torch.Generator().manual_seed(0))
    score[:3] = float("nan")
    mask = selection.select_mask(score, 0.3)
    assert int(mask.sum()) == 70 and not mask[:3].any()
    score[:50] = float("nan")  # the 70th largest is a NaN (-inf): every entry ties or ranks above it
    assert selection.select_mask(score, 0.3).all() and selection.threshold(score, 0.3) == -float("inf")


def test_an_empty_tensor_keeps_nothing_to_select():
    assert selection.select_mask(torch.zeros(0, 3), 0.3).shape == (0, 3)


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 4097])
def test_packed_mask_format(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.5
    bits = selection.pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (selection.packed_size(numel),)
    assert torch.equal(selection.unpack_mask(bits, (numel,)), mask)
    for i in range(min(numel, 20)):  # entry i is bit i % 8 of byte i // 8
        assert bool((int(bits[i // 8]) >> (i % 8)) & 1) == bool(mask[i])
    if numel % 8:
        assert int(bits[-1]) >> (numel % 8) == 0  # bits past the last entry are 0


def test_mix_normalised_score_divides_by_the_keep_count_and_damps_long_stages():
    score, count = torch.tensor([[4.0, 4.0]]), torch.tensor([2.0, 0.0])
    assert torch.equal(selection.mix_normalised_score(score, count, 10), torch.tensor([[2.0, 4.0]]))
    damped = selection.mix_normalised_score(score, count, 50)
    assert torch.allclose(damped, torch.tensor([[2.0 * math.exp(-2 / 50), 4.0]]))


def test_bf16_scores_are_selected_a_batch_at_a_time(monkeypatch):
    """A compiled selection converts bf16 scores to fp32 a bounded batch at a time
    (selection.batches); the masks are the reference's, fp32 scores among them or not."""
    from dps_fast import backends
    from dps_fast.backends import reference

    monkeypatch.setattr(selection, "CONVERSION_ENTRIES", 100)
    generator = torch.Generator().manual_seed(0)
    scores = [(torch.rand(n, generator=generator) * 4).round().to(dtype) for n, dtype in
              ((70, torch.bfloat16), (50, torch.bfloat16), (300, torch.bfloat16), (33, torch.float32),
               (0, torch.bfloat16), (90, torch.bfloat16))]
    assert selection.batches(scores) == [[3], [0], [1], [2], [4, 5]]  # the fp32 one, then runs of <= 100 entries
    want = reference.select_masks(scores, 0.3)
    for name in backends.available("cpu"):
        got = backends.resolve(name, "cpu").select_masks(scores, 0.3)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), name
