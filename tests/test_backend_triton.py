"""The Triton backend against the reference backend: the shared parity harness
and the direct checks of backend_checks.py, on sizes of several of its chunks,
plus what is Triton's own: tensors a kernel cannot address directly (copies
written back), a mixed list of scores, and the tables' alignment.

On a GPU the kernels are compiled; without one they run on CPU tensors through
Triton's interpreter (switched on by tests/conftest.py), so sizes stay small."""
import pytest
import torch

pytest.importorskip("triton", minversion="3.6")

from backend_checks import (DTYPES, HYPER, MODES, STORAGES, check_fallback, check_found_inf,  # noqa: E402
                            check_masked_norms, check_masked_out_inf, check_refuses_8bit, check_select,
                            check_stochastic_stores, check_update, make_scores)
from backend_parity import assert_matches_reference, cases  # noqa: E402
from dps_fast import backends  # noqa: E402
from dps_fast.backends import reference  # noqa: E402
from dps_fast.backends import triton_backend  # noqa: E402
from dps_fast.backends.triton_backend import tables  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MULTI_CHUNK = 2 * tables.CHUNK + 5  # three chunks, the last one short


def test_backend_runs_here():
    # In CI the interpreter tests must run, not skip: fail loudly if they cannot.
    assert backends.unavailable_reason("triton", DEVICE) is None
    assert "CUDA" in triton_backend.unavailable_reason(torch.device("meta"))


def test_auto_never_picks_the_interpreter():
    assert backends.resolve("auto", "cpu").NAME != "triton"


# Multi-step runs with stochastic stores need torch's fp32 rounding to the bit, which Triton's
# fusion need not give (cases' note); the stores themselves: test_stochastic_stores_are_...
@pytest.mark.parametrize("case", [kw for _, kw in cases(stochastic=False)],
                         ids=[name for name, _ in cases(stochastic=False)])
def test_matches_reference(case):
    assert_matches_reference("triton", DEVICE, **case)


# ----- select_masks -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "tied", "equal", "signed"])
@pytest.mark.parametrize("numel", [0, 1, 7, 4097, MULTI_CHUNK])
def test_select_masks_matches_reference(numel, kind):
    check_select(triton_backend, DEVICE, numel, kind)


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).split(".")[1])
def test_update_matches_reference(mode, dtype):
    check_update(triton_backend, DEVICE, mode, dtype, SHAPES)


@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: "-".join(s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_update_with_compact_state_and_stochastic_rounding(mode, dtype, storage):
    state_format, rounding = storage
    check_update(triton_backend, DEVICE, mode, dtype, SHAPES, state_format=state_format, rounding=rounding)


@pytest.mark.parametrize("mode", MODES)
def test_update_of_tensors_not_directly_addressable(mode):
    """A transposed (non-contiguous) param and a param 4 bytes off alignment are
    updated through copies that are written back."""
    def awkward(params):
        params[0] = params[0].t().contiguous().t()  # same values, column-major strides
        storage = torch.empty(params[2].numel() + 1, device=DEVICE)
        params[2] = storage[1:].copy_(params[2])  # storage offset of one fp32

    check_update(triton_backend, DEVICE, mode, torch.float32, SHAPES, transform=awkward)


@pytest.mark.parametrize("mode", MODES)
def test_update_applies_inv_scale_before_scoring_and_clip_after(mode):
    # inv_scale a power of 2: scores stay exact and compare bit for bit.
    scalar = lambda value: torch.tensor(value, device=DEVICE)  # noqa: E731
    check_update(triton_backend, DEVICE, mode, torch.float32, SHAPES, inv_scale=scalar(1 / 1024),
                 found_inf=scalar(0.0), grad_coef=scalar(0.5))


@pytest.mark.parametrize("mode", MODES)
def test_update_with_found_inf_writes_nothing(mode):
    check_found_inf(triton_backend, DEVICE, mode, SHAPES)


def test_8bit_state_is_refused():
    check_refuses_8bit(triton_backend, DEVICE)


def test_tensors_the_kernels_do_not_take_follow_the_reference():
    check_fallback(triton_backend, DEVICE)


def test_update_of_only_empty_tensors_is_a_no_op():
    empty = [torch.zeros(0, device=DEVICE)]
    triton_backend.update(empty, empty, empty, empty, [1], **HYPER)
    assert triton_backend.select_masks(empty, 0.3)[0].numel() == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf * 0, meant
def test_masked_out_inf_gradient_gives_nan_as_the_reference():
    """"grad" semantics multiply the gradient by the mask bit, as the reference and the C++
    kernels do: an inf gradient that the mask drops is NaN (inf * 0), not 0."""
    check_masked_out_inf(triton_backend, DEVICE, SHAPES, index=2)


@pytest.mark.parametrize("count", range(1, 6))
def test_table_sections_are_16_byte_aligned_for_any_tensor_count(count):
    """Triton specialises pointer arguments on 16-byte alignment: sections whose alignment
    changed with the tensor count would compile a kernel per count parity."""
    device = torch.device(DEVICE)
    views, chunks = tables.upload(device, [[i] * 7 for i in range(count)], [10] * count,
                                  floats=[0.5] * (2 * count + 1), extra=[3] * count)
    assert chunks == count
    assert all(view.data_ptr() % 16 == 0 for view in views)
    rows, owners, extra, floats = views
    assert rows.numel() == count * (2 + 7) and owners.tolist() == list(range(count))
    assert extra.tolist() == [3] * count and floats.tolist() == [0.5] * (2 * count + 1)


def test_stochastic_stores_are_the_references_to_the_bit():
    check_stochastic_stores(triton_backend, DEVICE)
