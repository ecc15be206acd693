"""state_dtype="8bit" (dps_fast.blockwise, dps_fast.state_format): the code maps, the
nearest code and its tie rule, zero and NaN blocks, and one update against a
hand-written dequantize / torch.optim.AdamW / quantize."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dps_fast import blockwise, selection
from dps_fast.backends import reference

MAPS, MIDPOINTS = blockwise.MAPS, blockwise.MIDPOINTS
SIGNS = [True, False]
SIGN_IDS = ["signed", "unsigned"]
# half the largest gap between neighbouring codes (0.0070 signed, 0.0035 unsigned), and an fp32
# rounding of the product MAP[code] * s and of the error: the most an entry moves, over its scale
HALF_STEP = {signed: (values[1:] - values[:-1]).max().item() / 2 + 2**-23 for signed, values in MAPS.items()}


def _per_entry(scales, shape):
    """Each entry's block scale, in `shape`."""
    return scales.repeat_interleave(blockwise.BLOCK)[:math.prod(shape)].view(shape)


def _bitsandbytes_map(signed):
    """bitsandbytes' functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8), as written
    there (fp32 linspace and means), for comparison."""
    data = []
    for i in range(7):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(data + [0, 1.0]), dtype=torch.float32)


@pytest.mark.parametrize("signed", SIGNS, ids=SIGN_IDS)
def test_the_maps_are_the_dynamic_maps(signed):
    values = MAPS[signed]
    assert values.dtype == torch.float32 and values.shape == (256,)
    assert (values[1:] > values[:-1]).all()  # sorted, 256 distinct codes
    assert values[-1] == 1.0 and values[blockwise.ZERO_CODE[signed]] == 0.0
    assert blockwise.ZERO_CODE[signed] == (127 if signed else 0)
    assert (values.min() == -values[-2]) if signed else (values.min() == 0.0)  # signed: +-0.99297 and 1.0
    reference_values = _bitsandbytes_map(signed)
    assert ((values.double() - reference_values.double()).abs() <= 2e-7 * reference_values.double().abs()).all()
    assert torch.equal(MIDPOINTS[signed], (values[:-1] + values[1:]) / 2)


def _nearest_by_brute_force(normal, signed):
    """The index of the map value nearest to each (fp32) value (the distances in float64, exact
    here), and at an fp32 midpoint the lower of its two: the tie rule, which also decides the
    values that rounding a true midpoint to fp32 moved past."""
    flat = normal.reshape(-1, 1)
    nearest = (flat.double() - MAPS[signed].double()).abs().argmin(dim=1)
    at_midpoint = flat == MIDPOINTS[signed]
    return torch.where(at_midpoint.any(dim=1), at_midpoint.int().argmax(dim=1), nearest).view(normal.shape)


def _kernel_search(normal, signed):
    """The kernels' branchless binary search (Note [nearest code]): 8 compares over the
    midpoints padded to 256 with +inf."""
    padded = torch.cat([MIDPOINTS[signed], torch.tensor([math.inf])])
    codes = torch.zeros(normal.shape, dtype=torch.int64)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        codes += torch.where(padded[codes + step - 1] < normal, step, 0)
    return codes


def _with_absmax_one(values, scale=1.0):
    """`values` (of magnitude at most `scale`) in blocks of 255 of them and `scale`: the
    blocks' absmax is `scale` (with 1, quantize sees x / s = x)."""
    rows = F.pad(values, (0, -values.numel() % 255)).view(-1, 255)
    return torch.cat([rows, torch.full((rows.shape[0], 1), scale)], dim=1).reshape(-1)


@pytest.mark.parametrize("signed", SIGNS, ids=SIGN_IDS)
def test_a_value_at_a_midpoint_takes_the_lower_code_as_the_kernels_search_gives(signed):
    mids, codes = MIDPOINTS[signed], torch.arange(255)
    up, down = torch.nextafter(mids, torch.tensor(math.inf)), torch.nextafter(mids, torch.tensor(-math.inf))

    def quantized(values):
        return blockwise.quantize(_with_absmax_one(values), signed)[0].long()[:values.numel()]

    assert torch.equal(quantized(mids), codes)  # at a midpoint: the lower code
    assert torch.equal(quantized(down), codes)
    assert torch.equal(quantized(up), codes + 1)  # one fp32 step above: the upper
    assert torch.equal(blockwise.quantize(MAPS[signed], signed)[0].long(), torch.arange(256))  # a code's own value
    # the spec's codes are the kernels' binary search and, off the midpoints, the nearest value
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(5000, generator=generator) * (2 if signed else 1) - (1 if signed else 0)
    x = _with_absmax_one(torch.cat([mids, up, down, MAPS[signed], uniform, torch.tensor([0.0, -0.0, 1e-30])]))
    got, scales = blockwise.quantize(x, signed)
    assert (scales == 1).all()
    assert torch.equal(got.long(), _kernel_search(x, signed))
    off = ~torch.isin(x, mids)
    assert torch.equal(got.long()[off], _nearest_by_brute_force(x[off], signed))
    # x / s is an IEEE division (x * (1 / s) differs near the midpoints: 1 / 3 is inexact)
    around = [mids * 3]
    for toward in (math.inf, -math.inf):
        value = mids * 3
        for _ in range(3):
            value = torch.nextafter(value, torch.tensor(toward))
            around.append(value)
    x = _with_absmax_one(torch.cat(around).clamp(-3, 3), scale=3.0)
    assert torch.equal(blockwise.quantize(x, signed)[0].long(), _nearest_by_brute_force(x / 3, signed))


def _moments(kind, numel, generator):
    """Test moments: exp_avg-like (signed, heavy-tailed) or exp_avg_sq-like (>= 0, many decades)."""
    if kind == "signed":
        return torch.randn(numel, generator=generator) * torch.rand(numel, generator=generator).pow(4) * 1e-3
    return torch.randn(numel, generator=generator).pow(2) * 10 ** (-8 * torch.rand(numel, generator=generator))


@pytest.mark.parametrize("shape", [(1,), (255,), (256,), (300,), (64, 64), (10007,), (7, 13, 50)], ids=str)
@pytest.mark.parametrize("signed", SIGNS, ids=SIGN_IDS)
def test_quantize_keeps_each_block_within_half_a_code_step(signed, shape):
    """Each block's scale is its absmax; each entry reads back as the map value nearest to
    x / s (to within the fp32 rounding of the product): an error of at most half the
    largest gap of the map (0.0070 s signed, 0.0035 s unsigned), and for entries of the
    top decade a relative error of at most 7% (signed), 3.5% (unsigned)."""
    generator = torch.Generator().manual_seed(math.prod(shape))
    x = _moments("signed" if signed else "unsigned", math.prod(shape), generator).view(shape)
    numel = x.numel()
    codes, scales = blockwise.quantize(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (blockwise.num_blocks(numel),)
    row_major = x.reshape(-1)
    assert torch.equal(scales, torch.stack([row_major[start:start + 256].abs().max() for start in range(0, numel, 256)]))
    back = blockwise.dequantize(codes, scales, signed)
    assert back.dtype == torch.float32 and back.shape == x.shape
    per_entry = _per_entry(scales, shape)
    assert torch.equal(codes.long(), _nearest_by_brute_force(x / per_entry, signed))
    assert HALF_STEP[signed] == pytest.approx(0.9 / 64 / 2 if signed else 0.9 / 128 / 2, rel=1e-4)
    error = (back - x).abs()
    assert (error <= per_entry * HALF_STEP[signed]).all()
    top = x.abs() >= 0.1 * per_entry
    assert (error[top] <= x.abs()[top] * HALF_STEP[signed] / 0.1).all()


def test_a_block_of_zeros_reads_back_zeros_without_nan():
    x = torch.randn(1000)
    x[256:512] = 0.0
    x[300] = -0.0
    x[768:] = 0.0  # the last block (232 entries), zero too
    for signed in SIGNS:
        codes, scales = blockwise.quantize(x if signed else x.abs(), signed)
        assert scales[1] == 0 and scales[3] == 0 and (scales[[0, 2]] > 0).all()
        zero = blockwise.ZERO_CODE[signed]
        assert (codes[256:512] == zero).all() and (codes[768:] == zero).all()
        back = blockwise.dequantize(codes, scales, signed)
        assert not back.isnan().any()
        assert (back[256:512] == 0).all() and (back[768:] == 0).all()


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("signed", SIGNS, ids=SIGN_IDS)
def test_a_non_finite_entry_makes_its_block_nan_and_no_other(signed, special):
    """The torch backend's behaviour, which is the spec: the block's scale is NaN, its codes
    are 0, and every entry of it dequantizes to NaN; the other blocks are as before."""
    generator = torch.Generator().manual_seed(3)
    x = _moments("signed" if signed else "unsigned", 1000, generator)
    clean_codes, clean_scales = blockwise.quantize(x, signed)
    x[260] = special
    codes, scales = blockwise.quantize(x, signed)
    assert scales[1].isnan() and (codes[256:512] == 0).all()
    others = torch.tensor([0, 2, 3])
    assert torch.equal(scales[others], clean_scales[others])
    keep = torch.ones(1000, dtype=torch.bool)
    keep[256:512] = False
    assert torch.equal(codes[keep], clean_codes[keep])
    back = blockwise.dequantize(codes, scales, signed)
    assert back[256:512].isnan().all() and not back[keep].isnan().any()


def test_blocks_follow_the_row_major_order_whatever_the_layout():
    """A transposed (non-contiguous) tensor's blocks are those of its row-major entries."""
    x = torch.randn(80, 64).t()
    codes, scales = blockwise.quantize(x, True)
    same_codes, same_scales = blockwise.quantize(x.contiguous(), True)
    assert torch.equal(codes, same_codes) and torch.equal(scales, same_scales)
    assert torch.equal(blockwise.dequantize(codes.t().contiguous().t(), scales, True),
                       blockwise.dequantize(same_codes, same_scales, True))


# ----- the update -----------------------------------------------------------------------

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
SHAPE = (64, 80)  # 5120 entries: 20 blocks, quantized (at least 4096)


def _hand_quantize(x, signed):
    """Block by block: scale = absmax, codes = nearest map values by brute force (ties: the lower)."""
    flat, codes, scales = x.reshape(-1), [], []
    for start in range(0, flat.numel(), 256):
        block = flat[start:start + 256]
        scale = block.abs().max()
        codes.append(_nearest_by_brute_force(block / scale if scale > 0 else torch.zeros_like(block), signed))
        scales.append(scale)
    return torch.cat(codes).to(torch.uint8).view(x.shape), torch.stack(scales)


def _hand_dequantize(codes, scales, signed):
    flat = codes.reshape(-1).long()
    return torch.cat([MAPS[signed][flat[start:start + 256]] * scales[start // 256]
                      for start in range(0, flat.numel(), 256)]).view(codes.shape)


def _eight_bit_state(generator):
    """A param, a gradient, and 8-bit moments (from random fp32 ones)."""
    param = torch.randn(SHAPE, generator=generator)
    grad = torch.randn(SHAPE, generator=generator)
    avg = _hand_quantize(torch.randn(SHAPE, generator=generator) * 1e-2, True)
    avg_sq = _hand_quantize(torch.rand(SHAPE, generator=generator) * 1e-4, False)
    return param, grad, avg, avg_sq


def _torch_adamw(param, grad, avg, avg_sq, step):
    """torch.optim.AdamW's step from fp32 moments: the new (param, exp_avg, exp_avg_sq)."""
    param = nn.Parameter(param.clone())
    adamw = torch.optim.AdamW([param], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                              weight_decay=HYPER["weight_decay"], foreach=False)
    adamw.state[param] = {"step": torch.tensor(float(step - 1)), "exp_avg": avg.clone(), "exp_avg_sq": avg_sq.clone()}
    param.grad = grad
    adamw.step()
    return param.detach(), adamw.state[param]["exp_avg"], adamw.state[param]["exp_avg_sq"]


def _reference_update(param, grad, avg, avg_sq, step, **kwargs):
    """reference.update of one 8-bit tensor, on copies: the new (param, (codes, scales), (codes, scales))."""
    param = param.clone()
    avg, avg_sq = [tuple(t.clone() for t in pair) for pair in (avg, avg_sq)]
    reference.update([param], [grad], [avg[0]], [avg_sq[0]], [step], **HYPER, state_format="8bit", seeds=[5],
                     exp_avg_scales=[avg[1]], exp_avg_sq_scales=[avg_sq[1]], **kwargs)
    return param, avg, avg_sq


def _assert_pair(got, want):
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("step", [1, 7])
def test_the_update_is_dequantize_then_adamw_then_quantize(step):
    generator = torch.Generator().manual_seed(step)
    param, grad, avg, avg_sq = _eight_bit_state(generator)
    want_param, want_avg, want_avg_sq = _torch_adamw(param, grad, _hand_dequantize(*avg, True),
                                                     _hand_dequantize(*avg_sq, False), step)
    got_param, got_avg, got_avg_sq = _reference_update(param, grad, avg, avg_sq, step)
    assert torch.equal(got_param, want_param)  # the update uses the fp32 moments, before they are stored
    _assert_pair(got_avg, _hand_quantize(want_avg, True))
    _assert_pair(got_avg_sq, _hand_quantize(want_avg_sq, False))


def test_freeze_leaves_whole_frozen_blocks_and_requantizes_the_others():
    """masked="freeze": a block with no updated entry keeps its codes and scale; in the
    others, a frozen entry is requantized from its dequantized value (within half a code
    step at the block's new scale), an updated one takes AdamW's value; the parameter
    changes only where updated."""
    generator = torch.Generator().manual_seed(11)
    param, grad, avg, avg_sq = _eight_bit_state(generator)
    first = _hand_dequantize(*avg, True)
    first.view(-1)[7] = -2 * first.abs().max()  # block 0's absmax negative: the signed map has no -1, so
    avg = _hand_quantize(first, True)           # requantizing the block would shrink its scale by 0.993
    keep = torch.rand(SHAPE, generator=generator) < 0.7
    flat = keep.view(-1)
    flat[:256] = False  # block 0: frozen
    flat[256:512] = False
    flat[300] = True  # block 1: one entry updated
    old = _hand_dequantize(*avg, True), _hand_dequantize(*avg_sq, False)
    new_param, new_avg, new_avg_sq = _torch_adamw(param, grad, *old, 3)
    got_param, got_avg, got_avg_sq = _reference_update(param, grad, avg, avg_sq, 3, masks=[selection.pack_mask(keep)],
                                                       freeze=True)
    assert torch.equal(got_param, torch.where(keep, new_param, param))
    for got, before, new, previous, signed in ((got_avg, avg, new_avg, old[0], True),
                                               (got_avg_sq, avg_sq, new_avg_sq, old[1], False)):
        want = _hand_quantize(torch.where(keep, new, previous), signed)
        touched = torch.ones(20, dtype=torch.bool)
        touched[0] = False
        assert torch.equal(got[1][touched], want[1][touched]) and got[1][0] == before[1][0]
        assert torch.equal(got[0].view(-1)[256:], want[0].view(-1)[256:])
        assert torch.equal(got[0].view(-1)[:256], before[0].view(-1)[:256])
        frozen = ~keep
        frozen.view(-1)[:256] = False
        moved = (_hand_dequantize(*got, signed) - previous).abs()
        assert (moved[frozen] <= _per_entry(got[1], SHAPE)[frozen] * HALF_STEP[signed]).all()


def test_grad_semantics_and_explore_update_8bit_like_adamw():
    """Exploit "grad": masked-out entries get a zero gradient (every block requantized); explore:
    the score is stored in bf16 as state_dtype="bf16" stores it."""
    generator = torch.Generator().manual_seed(4)
    param, grad, avg, avg_sq = _eight_bit_state(generator)
    keep = torch.rand(SHAPE, generator=generator) < 0.7
    want = _torch_adamw(param, grad * keep, _hand_dequantize(*avg, True), _hand_dequantize(*avg_sq, False), 2)
    got = _reference_update(param, grad, avg, avg_sq, 2, masks=[selection.pack_mask(keep)])
    assert torch.equal(got[0], want[0])
    _assert_pair(got[1], _hand_quantize(want[1], True))
    score, bf16_score = torch.zeros(SHAPE, dtype=torch.bfloat16), torch.zeros(SHAPE, dtype=torch.bfloat16)
    _reference_update(param, grad, avg, avg_sq, 2, scores=[score], reset_scores=[True])
    reference.update([param.clone()], [grad], [torch.zeros(SHAPE, dtype=torch.bfloat16)],
                     [torch.zeros(SHAPE, dtype=torch.bfloat16)], [2], **HYPER, state_format="bf16", seeds=[5],
                     scores=[bf16_score], reset_scores=[True])
    assert torch.equal(score, bf16_score) and not torch.equal(score, (grad * grad).bfloat16())


def test_the_update_asks_for_the_scales():
    generator = torch.Generator().manual_seed(5)
    param, grad, avg, avg_sq = _eight_bit_state(generator)
    with pytest.raises(ValueError, match="state_format='8bit': tensor 0 needs the block scales"):
        reference.update([param], [grad], [avg[0]], [avg_sq[0]], [1], **HYPER, state_format="8bit", seeds=[5])
