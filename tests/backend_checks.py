"""Direct checks of a fast backend against the reference backend, shared by
tests/test_backend_cpu.py, test_backend_cuda.py and test_backend_triton.py:
select_masks on odd sizes and tied or signed scores, one update of several
tensors in every mode and dtype (GradScaler and clip arguments included),
found_inf, an inf gradient masked out, tensors the kernels hand back to
the reference, and 8-bit state (which no kernel stores yet) refused. Each
check takes the backend module and the device."""
import math

import pytest
import torch

from dps_fast import blockwise, param_state, selection
from dps_fast.backends import cpu, reference
from training import grid_grad

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
# The CPU kernels' chunk of entries: sizes below cross it (the CUDA and Triton kernels' chunks
# are no larger). Without the CPU module (a pure-Python install) any such size serves.
CHUNK = cpu._kernels.chunk_entries if cpu._kernels is not None else 1 << 16
SIZES = [0, 1, 7, 4097, 2 * CHUNK + 37]
MODES = ["plain", "explore", "explore-accumulate", "grad", "freeze"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (state_format, rounding) besides the default ("fp32", "nearest"): compact state, stochastic stores
STORAGES = [("bf16", "nearest"), ("fp32", "stochastic"), ("bf16", "stochastic")]


def make_scores(kind, numel, generator):
    """Scores of `kind` (random, tied, equal, signed) for selection checks."""
    if kind == "random":
        return torch.rand(numel, generator=generator)
    if kind == "tied":  # few distinct values: many ties at the threshold
        return torch.randint(0, 4, (numel,), generator=generator).float()
    if kind == "equal":
        return torch.full((numel,), 0.25)
    # signed values, both zeros, infinities, tiny numbers, NaN (ranks as -inf): the order key of dps_fast.selection
    values = torch.tensor([-1.5, -0.0, 0.0, 2.0, float("inf"), -float("inf"), 1e-30, -1e-30, 1e-45, float("nan")])
    return values[torch.randint(0, len(values), (numel,), generator=generator)]


def check_select(backend, device, numel, kind):
    generator = torch.Generator().manual_seed(numel + len(kind))
    score = make_scores(kind, numel, generator)
    on_device = score.to(device)
    for sparsity in (0.0, 0.3, 0.5, 0.99):
        got, = backend.select_masks([on_device], sparsity)
        want, = reference.select_masks([score], sparsity)
        assert got.dtype == torch.uint8 and got.shape == want.shape and got.device == on_device.device
        assert torch.equal(got.cpu(), want), f"numel {numel}, {kind}, sparsity {sparsity}"


def check_select_many(backend, device):
    """Tensors of mixed sizes and shapes in one call."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(33, 17), (0, 3), (1,), (7,), (4097,), (2 * CHUNK + 37,), (64, 65)]
    scores = [(torch.randint(0, 64, shape, generator=generator).float() / 16) ** 2 for shape in shapes]
    got = backend.select_masks([s.to(device) for s in scores], 0.3)
    want = reference.select_masks(scores, 0.3)
    assert len(got) == len(want)
    for g, w, shape in zip(got, want, shapes):
        assert torch.equal(g.cpu(), w), shape
        kept = selection.unpack_mask(g.cpu(), shape).sum().item()
        assert kept >= selection.kept_count(math.prod(shape), 0.3)


def _state(shapes, dtype, generator, device, state_format="fp32"):
    """params, grads (on the 1/16 grid: exact squares), moments and scores (of
    param_state.state_dtype in `state_format`), masks."""
    params = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    grads = [grid_grad(s, generator, dtype) for s in shapes]
    wide = param_state.state_dtype(params[0], state_format)
    avgs = [(torch.randn(s, generator=generator) * 0.1).to(wide) for s in shapes]
    sqs = [(torch.rand(s, generator=generator) * 0.01).to(wide) for s in shapes]
    scores = [(torch.rand(s, generator=generator).mul(64).round() / 16).to(wide) for s in shapes]
    masks = [selection.pack_mask(torch.rand(s, generator=generator) < 0.7) for s in shapes]
    every = [params, grads, avgs, sqs, scores, masks]
    return [[t.to(device) for t in group] for group in every]


def _compare(got, want, what):
    """Scores (and the untouched gradients) exactly, fp32 to 1e-6, low-precision values
    (parameters, bf16 moments) to 1 ulp: a 1-ulp fp32 difference can round either way."""
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = g.cpu(), w.cpu()
        if what in ("score", "grad"):
            assert torch.equal(g, w), f"{what} {i}"
        else:
            tol = torch.finfo(w.dtype).eps if w.dtype in (torch.bfloat16, torch.float16) else 1e-6
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol, msg=f"{what} {i}")


def _mode_arguments(mode, scores, masks):
    """The update's arguments of `mode` (one of MODES): explore resets every score,
    explore-accumulate every other one."""
    if mode.startswith("explore"):
        return dict(scores=scores, reset_scores=[mode == "explore" or i % 2 == 0 for i in range(len(scores))])
    if mode in ("grad", "freeze"):
        return dict(masks=masks, freeze=mode == "freeze")
    return {}


def check_update(backend, device, mode, dtype, shapes, transform=None, state_format="fp32", rounding="nearest",
                 **scalars):
    """One update of several tensors (per-tensor steps) against the reference.
    mode: one of MODES. transform(params), if given, may replace the backend's
    parameters by tensors of the same values (e.g. ones a kernel cannot address).
    state_format, rounding: the storage (STORAGES); each tensor gets its own seed and
    a shard's offset into a whole tensor."""
    generator = torch.Generator().manual_seed(len(shapes) + len(mode))
    params, grads, avgs, sqs, scores, masks = _state(shapes, dtype, generator, device, state_format)
    steps = [1 + 3 * i for i in range(len(shapes))]
    storage = dict(state_format=state_format, rounding=rounding, seeds=[1000 + 7 * i for i in range(len(shapes))],
                   offsets=[(1 << 32) - 5 if i == 1 else 3 * i for i in range(len(shapes))])  # one crosses 2^32
    kwargs = dict(HYPER, **scalars, **storage, **_mode_arguments(mode, scores, masks))
    copies = [[t.cpu().clone() for t in group] for group in (params, grads, avgs, sqs, scores)]
    if transform is not None:
        transform(params)
    want_kwargs = dict(kwargs)
    if "scores" in kwargs:
        want_kwargs["scores"] = copies[4]
    if "masks" in kwargs:
        want_kwargs["masks"] = [m.cpu() for m in masks]
    for name in ("grad_coef", "inv_scale", "found_inf"):
        if kwargs.get(name) is not None:
            want_kwargs[name] = kwargs[name].cpu()
    backend.update(params, grads, avgs, sqs, steps, **kwargs)
    reference.update(copies[0], copies[1], copies[2], copies[3], steps, **want_kwargs)
    _compare(params, copies[0], "param")
    _compare(avgs, copies[2], "exp_avg")
    _compare(sqs, copies[3], "exp_avg_sq")
    _compare(scores, copies[4], "score")
    _compare(grads, copies[1], "grad")  # never written


def check_found_inf(backend, device, mode="explore", shapes=((7,), (4097,), (0,))):
    """A nonzero found_inf writes nothing at all."""
    generator = torch.Generator().manual_seed(3)
    params, grads, avgs, sqs, scores, masks = _state(shapes, torch.float32, generator, device)
    before = [t.clone() for t in params + avgs + sqs + scores]
    found_inf = torch.ones((), device=device)
    backend.update(params, grads, avgs, sqs, list(range(1, len(shapes) + 1)), **HYPER,
                   **_mode_arguments(mode, scores, masks), found_inf=found_inf,
                   inv_scale=torch.full((), 0.5, device=device))
    for i, (old, new) in enumerate(zip(before, params + avgs + sqs + scores)):
        assert torch.equal(old, new), f"tensor {i} changed"


def check_masked_out_inf(backend, device, shapes, index):
    """"grad" semantics multiply the gradient by the mask bit, as the reference does: an
    inf gradient that the mask drops (in tensor `index`) gives NaN (inf * 0), not 0."""
    generator = torch.Generator().manual_seed(5)
    params, grads, avgs, sqs, _, masks = _state(shapes, torch.float32, generator, device)
    dropped = ~selection.unpack_mask(masks[index].cpu(), (grads[index].numel(),))
    grads[index].view(-1)[dropped.nonzero()[0].to(grads[index].device)] = float("inf")
    steps = [1] * len(shapes)
    copies = [[t.cpu().clone() for t in group] for group in (params, grads, avgs, sqs, masks)]
    backend.update(params, grads, avgs, sqs, steps, **HYPER, masks=masks)
    reference.update(*copies[:4], steps, **HYPER, masks=copies[4])
    got, want = params[index].cpu(), copies[0][index]
    assert want.isnan().any()
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-6)


def check_fallback(backend, device):
    """Tensors the kernels do not take (non-contiguous, float64) still follow the reference."""
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(9, 5, generator=generator)
    params = [base.t().to(device), torch.randn(6, generator=generator, dtype=torch.float64).to(device),
              torch.randn(4097, generator=generator).to(device)]
    grads = [grid_grad(p.shape, generator, p.dtype).to(device) for p in params]
    grads[0] = grads[0].t().contiguous().t()  # same strides as its parameter
    avgs, sqs, scores = ([param_state.zeros(p) for p in params] for _ in range(3))  # float64 state for float64
    want = [[t.cpu().clone() for t in group] for group in (params, avgs, sqs, scores)]
    backend.update(params, grads, avgs, sqs, [1, 1, 1], **HYPER, scores=scores, reset_scores=[True] * 3)
    reference.update(want[0], [g.cpu() for g in grads], want[1], want[2], [1, 1, 1], **HYPER, scores=want[3],
                     reset_scores=[True] * 3)
    for got, expected in zip((params, avgs, sqs, scores), want):
        for g, w in zip(got, expected):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-6, atol=1e-6)
    # a tensor lr reaches the fallback as it is (the reference rounds it as torch.optim.AdamW does)
    hyper = dict(HYPER, lr=torch.tensor(HYPER["lr"]))
    grad = torch.randn(6, generator=generator, dtype=torch.float64)
    tensors = [torch.randn(6, generator=generator, dtype=torch.float64), torch.zeros(6, dtype=torch.float64),
               torch.zeros(6, dtype=torch.float64)]
    want = [t.clone() for t in tensors]
    got = [t.to(device) for t in tensors]
    backend.update([got[0]], [grad.to(device)], [got[1]], [got[2]], [1], **hyper)
    reference.update([want[0]], [grad], [want[1]], [want[2]], [1], **hyper)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    # masked norms of those tensors: the reference's values
    grads = [grads[0], grads[1]]
    masks = [selection.pack_mask(torch.rand(g.shape, generator=generator) < 0.7).to(device) for g in grads]
    assert torch.equal(backend.masked_norms(grads, masks).cpu(),
                       reference.masked_norms([g.cpu() for g in grads], [m.cpu() for m in masks]))


def check_refuses_8bit(backend, device):
    """state_format="8bit" is a ValueError naming it and backend='torch' (no kernel stores it
    yet), before anything is written."""
    generator = torch.Generator().manual_seed(8)
    params = [torch.randn(64, 80, generator=generator).to(device)]
    grads = [grid_grad((64, 80), generator).to(device)]
    codes = [blockwise.zero_codes(params[0], signed) for signed in (True, False)]
    scales = [torch.zeros(blockwise.num_blocks(params[0].numel()), device=device) for _ in range(2)]
    before = params[0].clone()
    with pytest.raises(ValueError, match="no compiled or Triton kernel stores state_dtype='8bit' yet "
                                         "\\(backend='torch' does\\)"):
        backend.update(params, grads, [codes[0]], [codes[1]], [1], **HYPER, state_format="8bit", seeds=[1],
                       exp_avg_scales=[scales[0]], exp_avg_sq_scales=[scales[1]])
    assert torch.equal(params[0], before)


def check_masked_norms(backend, device, dtype):
    """clip_grad_norm_'s per-tensor masked norms: every size, a tensor the kernels
    do not take (non-contiguous), and NaN where a masked-out entry is inf (grad * mask)."""
    generator = torch.Generator().manual_seed(6)
    shapes = [(n,) for n in SIZES] + [(33, 17)]
    grads = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    grads.append(torch.randn(9, 5, generator=generator).to(dtype).t())
    masks = [selection.pack_mask(torch.rand(g.shape, generator=generator) < 0.7) for g in grads]
    want = reference.masked_norms(grads, masks)
    got = backend.masked_norms([g.to(device) for g in grads], [m.to(device) for m in masks])
    assert got.dtype == torch.float64 and got.shape == (len(grads),)
    # to the bit: exact squares summed in float64 (off by ~1e-12 in another order), rounded to the dtype
    assert torch.equal(got.cpu(), want), (got, want)
    blocked = grads[3].clone()
    blocked[~selection.unpack_mask(masks[3], blocked.shape)] = float("inf")  # inf only where masked out
    again = backend.masked_norms([blocked.to(device), grads[2].to(device)], [masks[3].to(device), masks[2].to(device)])
    assert again[0].isnan() and again[1] == got[2]


def check_stochastic_stores(backend, device):
    """The stochastic stores to the bit: with beta1 = beta2 = 0, no decay, lr 2^-24, zero
    moments and gradients on the 1/16 grid, every fp32 value of the step is the same on
    every backend whatever it fuses (m = g, v = g^2 exactly; p - 2^-24 sign(g), one IEEE
    addition), so its bf16/fp16 stores must be the reference's, bit for bit."""
    hyper = dict(lr=2.0 ** -24, beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0)
    # several chunks; indices crossing 2^32 at an entry that is not a multiple of 32 (in the
    # middle of a chunk of the large tensor, and inside a small one); an fp16 tensor of
    # values below fp16's normal range (the small-value stores)
    shapes = [(2 * CHUNK + 37,), (4097,), (7,), (33, 17)]
    offsets = [(1 << 32) - CHUNK - 45, (1 << 32) - 37, (1 << 32) - 3, 11]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for state_format, rounding in STORAGES:
            for mode in ("explore", "grad", "freeze"):
                generator = torch.Generator().manual_seed(9 + len(mode))
                params = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
                params[2] = (params[2].float() * 1e-6).to(dtype)
                grads = [grid_grad(s, generator, dtype) for s in shapes]
                wide = param_state.state_dtype(params[0], state_format)
                avgs, sqs = ([torch.zeros(s, dtype=wide) for s in shapes] for _ in range(2))
                scores = [(torch.rand(s, generator=generator).mul(64).round() / 16).to(wide) for s in shapes]
                masks = [selection.pack_mask(torch.rand(s, generator=generator) < 0.7) for s in shapes]
                storage = dict(state_format=state_format, rounding=rounding, seeds=[5, 6, 7, 8], offsets=offsets)
                want = [[t.clone() for t in group] for group in (params, avgs, sqs, scores)]
                got = [[t.to(device) for t in group] for group in (params, avgs, sqs, scores)]
                steps = [1] * len(shapes)
                reference.update(want[0], grads, want[1], want[2], steps, **hyper, **storage,
                                 **_mode_arguments(mode, want[3], masks))
                device_extra = _mode_arguments(mode, got[3], [m.to(device) for m in masks])
                backend.update(got[0], [g.to(device) for g in grads], got[1], got[2], steps, **hyper, **storage,
                               **device_extra)
                for what, mine, theirs in zip(("param", "exp_avg", "exp_avg_sq", "score"), got, want):
                    for i, (a, b) in enumerate(zip(mine, theirs)):
                        assert torch.equal(a.cpu(), b), f"{dtype} {state_format} {rounding} {mode}: {what} {i}"
