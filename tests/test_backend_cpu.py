"""The compiled CPU backend against the reference backend: the shared parity
harness (backend_parity.py), the direct checks of backend_checks.py, the
kernels of every instruction set this CPU runs, and the sample-bounded
selection of large tensors with its fallback."""
import pytest
import torch

from backend_checks import (CHUNK, DTYPES, MODES, SIZES, STORAGES, check_fallback, check_found_inf,
                            check_masked_norms, check_masked_out_inf, check_refuses_8bit, check_select,
                            check_select_many, check_stochastic_stores, check_update)
from backend_parity import assert_matches_reference, cases
from dps_fast import DPSAdamW, backends

cpu = pytest.importorskip("dps_fast.backends.cpu")
if cpu.unavailable_reason(torch.device("cpu")) is not None:  # tests/test_build.py says whether it should be
    pytest.skip(cpu.unavailable_reason(torch.device("cpu")), allow_module_level=True)
kernels = cpu._kernels


# ----- CPU tests ----------------------------------------------------------------------

def test_auto_picks_the_cpu_backend():
    assert backends.resolve("auto", "cpu").NAME == "cpu"
    assert "CPU tensors only" in cpu.unavailable_reason(torch.device("meta"))


@pytest.mark.parametrize("case", [kw for _, kw in cases()], ids=[name for name, _ in cases()])
def test_matches_reference(case):
    assert_matches_reference("cpu", "cpu", **case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_norms_match_reference(dtype):
    check_masked_norms(cpu, "cpu", dtype)


@pytest.mark.parametrize("isa", kernels.runnable_isas()[1:])
def test_other_instruction_sets_match_reference(isa):
    """The kernels built for older CPUs, on this one (stochastic stores one step at a
    time from identical state: these kernels need not round fp32 as torch's do here)."""
    best = kernels.isa()
    kernels.set_isa(isa)
    try:
        for _, case in cases(quick=True, stochastic=False):
            assert_matches_reference("cpu", "cpu", **case)
        for dtype in DTYPES:
            check_update(cpu, "cpu", "freeze", dtype, [(4097,), (37,)])
            check_masked_norms(cpu, "cpu", dtype)
            for state_format, rounding in STORAGES:
                check_update(cpu, "cpu", "explore", dtype, [(4097,), (37,)], state_format=state_format,
                             rounding=rounding)
        check_select(cpu, "cpu", 4097, "signed")
    finally:
        kernels.set_isa(best)


@pytest.mark.parametrize("kind", ["random", "tied", "equal", "signed"])
@pytest.mark.parametrize("numel", SIZES)
def test_select_masks_matches_reference(numel, kind):
    check_select(cpu, "cpu", numel, kind)


def test_select_masks_of_many_tensors():
    check_select_many(cpu, "cpu")


@pytest.mark.parametrize("sigmas", [4.0, 0.0], ids=["sampled", "bounds-missed"])
@pytest.mark.parametrize("kind", ["random", "tied", "signed"])
def test_select_masks_of_large_tensors(kind, sigmas):
    """Tensors of sampled_min_entries or more: sample-bounded selection, falling back to the
    radix select when its bounds miss (forced with zero-width bounds) or ties crowd them."""
    old = kernels.set_sample_sigmas(sigmas)
    try:
        check_select(cpu, "cpu", kernels.sampled_min_entries + 37, kind)
    finally:
        kernels.set_sample_sigmas(old)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_update_matches_reference(mode, dtype):
    check_update(cpu, "cpu", mode, dtype, [(2 * CHUNK + 37,), (7,), (0,), (1,), (33, 17)])


@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: "-".join(s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_update_with_compact_state_and_stochastic_rounding(mode, dtype, storage):
    state_format, rounding = storage
    check_update(cpu, "cpu", mode, dtype, [(2 * CHUNK + 37,), (7,), (0,), (1,), (33, 17)], state_format=state_format, rounding=rounding)


@pytest.mark.parametrize("mode", MODES)
def test_update_with_grad_scaler_and_clip(mode):
    check_update(cpu, "cpu", mode, torch.float32, [(4097,), (7,)], inv_scale=torch.full((), 1 / 1024),
                 found_inf=torch.zeros(()), grad_coef=torch.full((), 0.37))


def test_found_inf_writes_nothing():
    check_found_inf(cpu, "cpu")


def test_8bit_state_is_refused():
    check_refuses_8bit(cpu, "cpu")


def test_masked_out_inf_gradient_gives_nan_as_the_reference():
    check_masked_out_inf(cpu, "cpu", [(7,), (4097,)], index=1)


def test_tensors_the_kernels_do_not_take_follow_the_reference():
    check_fallback(cpu, "cpu")


def test_optimizer_picks_it_and_steps():
    param = torch.nn.Parameter(torch.randn(100))
    opt = DPSAdamW([param], stage_steps=2)
    assert opt._backend_for(param.device).NAME == "cpu"
    for _ in range(5):
        param.grad = torch.randn(100)
        opt.step()
    assert opt.mask(param).sum() >= 70


def test_stochastic_stores_are_the_references_to_the_bit():
    check_stochastic_stores(cpu, "cpu")
