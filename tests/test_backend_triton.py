"""The Triton backend against the reference backend: the shared parity harness,
plus direct checks of select_masks, masked_norms and update (GradScaler arguments, dtypes,
tensors a kernel cannot address directly, tensors of several chunks).

On a GPU the kernels are compiled; without one they run on CPU tensors through
Triton's interpreter (switched on by tests/conftest.py), so sizes stay small."""
import pytest
import torch

pytest.importorskip("triton", minversion="3.6")

from backend_checks import check_masked_norms, make_scores  # noqa: E402
from backend_parity import assert_matches_reference, cases  # noqa: E402
from dps_fast import backends  # noqa: E402
from dps_fast.backends import reference  # noqa: E402
from dps_fast.backends import triton_backend  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MULTI_CHUNK = 2 * triton_backend._CHUNK + 5  # three chunks, the last one short
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def test_backend_runs_here():
    # In CI the interpreter tests must run, not skip: fail loudly if they cannot.
    assert backends.unavailable_reason("triton", DEVICE) is None
    assert "CUDA" in triton_backend.unavailable_reason(torch.device("meta"))


def test_auto_never_picks_the_interpreter():
    assert backends.resolve("auto", "cpu").NAME != "triton"


@pytest.mark.parametrize("case", [kw for _, kw in cases()],
                         ids=[name for name, _ in cases()])
def test_matches_reference(case):
    assert_matches_reference("triton", DEVICE, **case)


# ----- select_masks -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "tied", "equal", "signed"])
@pytest.mark.parametrize("numel", [0, 1, 7, 4097, MULTI_CHUNK])
def test_select_masks_matches_reference(numel, kind):
    generator = torch.Generator().manual_seed(numel)
    score = make_scores(kind, numel, generator).to(DEVICE)
    for sparsity in (0.0, 0.3, 0.5, 0.99):
        got, = triton_backend.select_masks([score], sparsity)
        want, = reference.select_masks([score.cpu()], sparsity)
        assert got.dtype == torch.uint8 and got.device == score.device
        assert torch.equal(got.cpu(), want), f"sparsity {sparsity}"


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf * 0, meant
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_masked_norms_match_reference(dtype):
    check_masked_norms(triton_backend, DEVICE, dtype)


def test_select_masks_of_a_mixed_list():
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(33, 17, generator=generator), torch.zeros(0, 3), make_scores("tied", 4097, generator),
              torch.rand(1, generator=generator), make_scores("signed", 7, generator),
              torch.rand(17, 33, generator=generator).t(),  # not contiguous: flattened in logical order
              torch.rand(MULTI_CHUNK, generator=generator)]
    got = triton_backend.select_masks([s.to(DEVICE) for s in scores], 0.3)
    want = reference.select_masks(scores, 0.3)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g.cpu(), w), f"tensor {i}"


# ----- update -------------------------------------------------------------------------

SHAPES = [(33, 17), (0, 3), (4097,), (1,), (7,), (MULTI_CHUNK,)]


def _update_args(kind, dtype=torch.float32, grad_scale=1.0):
    """Keyword arguments, on DEVICE, of one update call of `kind` (plain, explore, grad, freeze)."""
    generator = torch.Generator().manual_seed(0)
    rand = lambda shape: torch.randn(shape, generator=generator)  # noqa: E731
    grids = [torch.randint(-63, 64, shape, generator=generator).float() / 16 for shape in SHAPES]
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # dps_fast.param_state.state_dtype
    args = dict(params=[rand(s).to(dtype) for s in SHAPES],
                grads=[(g * grad_scale).to(dtype) for g in grids],  # exact: scores compare bit for bit
                exp_avgs=[rand(s).to(wide) for s in SHAPES], exp_avg_sqs=[rand(s).abs().to(wide) for s in SHAPES],
                steps=[3, 1, 5, 2, 7, 4])
    if kind == "explore":
        args.update(scores=[(torch.randint(0, 64, s, generator=generator).float() / 16).to(wide) for s in SHAPES],
                    reset_scores=[i % 2 == 0 for i in range(len(SHAPES))])
    elif kind in ("grad", "freeze"):
        args.update(masks=reference.select_masks([torch.rand(s, generator=generator) for s in SHAPES], 0.3),
                    freeze=kind == "freeze")
    return {name: [v.to(DEVICE) if isinstance(v, torch.Tensor) else v for v in value] if isinstance(value, list)
            else value for name, value in args.items()}


def _written(args):
    return args["params"] + args["exp_avgs"] + args["exp_avg_sqs"] + args.get("scores", [])


def _assert_same_update(kind, dtype=torch.float32, grad_scale=1.0, transform=None, **extra):
    """Run one update with both backends on equal inputs; compare everything written:
    scores exactly, fp32 to 1e-6, a bf16/fp16 param to 1 ulp."""
    results = []
    for backend in (triton_backend, reference):
        args = _update_args(kind, dtype, grad_scale)
        if transform is not None:
            transform(args)
        backend.update(**args, **HYPER, **extra)
        results.append(_written(args))
    n = len(SHAPES)
    for i, (got, want) in enumerate(zip(*results)):
        if i >= 3 * n:
            assert torch.equal(got.cpu(), want.cpu()), f"score {i - 3 * n}"
        else:
            low_precision = i < n and dtype in (torch.bfloat16, torch.float16)
            tol = torch.finfo(dtype).eps if low_precision else 1e-6
            torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=tol, atol=tol,
                                       msg=f"tensor {i}")


@pytest.mark.parametrize("kind", ["plain", "explore", "grad", "freeze"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).split(".")[1])
def test_update_matches_reference(kind, dtype):
    _assert_same_update(kind, dtype)


@pytest.mark.parametrize("kind", ["plain", "explore", "grad", "freeze"])
def test_update_of_tensors_not_directly_addressable(kind):
    """A transposed (non-contiguous) param and a param 4 bytes off alignment are
    updated through copies that are written back."""
    def awkward(args):
        params = args["params"]
        params[0] = params[0].t().contiguous().t()  # same values, column-major strides
        storage = torch.empty(params[2].numel() + 1, device=DEVICE)
        params[2] = storage[1:].copy_(params[2])  # storage offset of one fp32

    _assert_same_update(kind, transform=awkward)


@pytest.mark.parametrize("kind", ["explore", "grad", "freeze"])
def test_update_applies_inv_scale_before_scoring_and_clip_after(kind):
    # Gradients scaled by 1024 and unscaled in the kernel: exact, so scores compare bit for bit.
    scalar = lambda value: torch.tensor(value, device=DEVICE)  # noqa: E731
    _assert_same_update(kind, grad_scale=1024.0, inv_scale=scalar(1 / 1024), found_inf=scalar(0.0),
                        grad_coef=scalar(0.5))


@pytest.mark.parametrize("kind", ["plain", "explore", "grad", "freeze"])
def test_update_with_found_inf_writes_nothing(kind):
    args = _update_args(kind, grad_scale=1024.0)
    before = [t.clone() for t in _written(args)]
    triton_backend.update(**args, **HYPER, inv_scale=torch.tensor(1 / 1024, device=DEVICE),
                          found_inf=torch.tensor(1.0, device=DEVICE))
    for i, (after, was) in enumerate(zip(_written(args), before)):
        assert torch.equal(after, was), f"tensor {i} changed"


def test_update_of_only_empty_tensors_is_a_no_op():
    empty = [torch.zeros(0, device=DEVICE)]
    triton_backend.update(empty, empty, empty, empty, [1], **HYPER)
    assert triton_backend.select_masks(empty, 0.3)[0].numel() == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf * 0, meant
def test_masked_out_inf_gradient_gives_nan_as_the_reference():
    """"grad" semantics multiply the gradient by the mask bit, as the reference and the C++
    kernels do: an inf gradient that the mask drops is NaN (inf * 0), not 0."""
    results = []
    for backend in (triton_backend, reference):
        args = _update_args("grad")
        dropped = ~reference_mask(args["masks"][2], args["params"][2].shape)
        args["grads"][2][dropped.nonzero()[0]] = float("inf")
        backend.update(**args, **HYPER)
        results.append(args["params"][2].cpu())
    assert results[1].isnan().any()
    torch.testing.assert_close(results[0], results[1], equal_nan=True, rtol=1e-6, atol=1e-6)


def reference_mask(bits, shape):
    from dps_fast import selection
    return selection.unpack_mask(bits.cpu(), shape).to(DEVICE)


@pytest.mark.parametrize("count", range(1, 6))
def test_table_sections_are_16_byte_aligned_for_any_tensor_count(count):
    """Triton specialises pointer arguments on 16-byte alignment: sections whose alignment
    changed with the tensor count would compile a kernel per count parity."""
    device = torch.device(DEVICE)
    views, chunks = triton_backend._upload(device, [[i] * 7 for i in range(count)], [10] * count,
                                           floats=[0.5] * (2 * count + 1), extra=[3] * count)
    assert chunks == count
    assert all(view.data_ptr() % 16 == 0 for view in views)
    rows, owners, extra, floats = views
    assert rows.numel() == count * (2 + 7) and owners.tolist() == list(range(count))
    assert extra.tolist() == [3] * count and floats.tolist() == [0.5] * (2 * count + 1)
