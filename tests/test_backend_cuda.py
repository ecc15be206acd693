"""The compiled CUDA backend.

Everywhere (CI included): the build produced the module when nvcc is present,
it imports without a GPU, and using it without a driver raises a clear
RuntimeError. On a GPU: the parity harness and the direct checks of
backend_checks.py against the reference, unaligned tensors, no host
synchronisation, one launch per step, and a tensor of more than 2^31 entries
(64-bit indexing)."""
import importlib
import os
import shutil

import pytest
import torch

from backend_checks import (DTYPES, MODES, SIZES, check_fallback, check_found_inf, check_masked_norms, check_select,
                            check_select_many, check_update)
from backend_parity import assert_matches_reference, cases
from scaler_checks import assert_sync_free_matches_host_synced
from dps_fast import DPSAdamW, backends, selection
from dps_fast.backends import reference

MODULE = "dps_fast._cuda_kernels"


def _nvcc():
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    found = [os.environ.get("CUDACXX"), shutil.which("nvcc")] + [h and os.path.join(h, "bin", "nvcc") for h in homes]
    return next((f for f in found if f and os.path.isfile(f)), None)


def _module():
    try:
        return importlib.import_module(MODULE)
    except ImportError:
        return None


cuda_backend = importlib.import_module("dps_fast.backends.cuda")
ON_GPU = cuda_backend.unavailable_reason(torch.device("cuda")) is None
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU the CUDA backend can use")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
built = pytest.mark.skipif(_module() is None, reason="the CUDA module is not built")


# ----- everywhere ---------------------------------------------------------------------

@pytest.mark.skipif(_nvcc() is None or os.environ.get("DPS_FAST_CUDA", "auto") == "0",
                    reason="no nvcc here (or DPS_FAST_CUDA=0): the CUDA module is not expected")
def test_module_is_built_when_nvcc_is_present():
    assert _module() is not None, (f"nvcc is at {_nvcc()} but {MODULE} was not built; "
                                   "reinstall with `pip install -v .` and read the dps_fast warnings")


@built
def test_module_describes_itself():
    module = _module()
    archs = module.archs.split(",")
    assert archs and all(a.isdigit() for a in archs), module.archs  # explicit architectures, never 'native'
    assert module.runtime_version >= 11000


@built
@no_gpu
def test_without_a_driver_it_raises_a_clear_error():
    module = _module()
    reason = module.unavailable_reason()
    assert reason and ("driver" in reason or "GPU" in reason), reason
    with pytest.raises(RuntimeError, match="cannot run"):
        module.device_count()
    with pytest.raises(RuntimeError, match="cannot run"):  # checked before any address is touched
        module.update(0, 0, 0, 0, [1], [1], [1], [1], [], [], [4], [1], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="cannot run"):
        module.select(0, 0, [1], [1], [4], [1])
    assert reason in cuda_backend.unavailable_reason(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        backends.resolve("cuda", "cuda")


def test_cpu_tensors_are_refused_with_the_reason():
    assert "CUDA tensors only" in cuda_backend.unavailable_reason(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu"):
        DPSAdamW([torch.nn.Parameter(torch.zeros(3))], stage_steps=2, backend="cuda")


# ----- on a GPU -----------------------------------------------------------------------

@gpu
def test_auto_picks_the_cuda_backend():
    assert backends.resolve("auto", "cuda").NAME == "cuda"


@gpu
@pytest.mark.parametrize("case", [kw for _, kw in cases()], ids=[name for name, _ in cases()])
def test_matches_reference(case):
    assert_matches_reference("cuda", "cuda", **case)


@gpu
@pytest.mark.parametrize("kind", ["random", "tied", "equal", "signed"])
@pytest.mark.parametrize("numel", SIZES + [3 * 65536 + 33])
def test_select_masks_matches_reference(numel, kind):
    check_select(cuda_backend, "cuda", numel, kind)


@gpu
def test_select_masks_of_many_tensors():
    check_select_many(cuda_backend, "cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_update_matches_reference(mode, dtype):
    check_update(cuda_backend, "cuda", mode, dtype, [(2 * 16384 + 37,), (7,), (0,), (1,), (33, 17), (4097,)])


@gpu
def test_unaligned_tensors_take_the_scalar_path():
    # contiguous, not 16-byte aligned; separate storages (overlapping views would race)
    views = [torch.zeros(4101, device="cuda")[1:], torch.zeros(4101, device="cuda")[2:4099]]
    for view in views:
        view.copy_(torch.randn(view.shape))
    grads = [torch.randint(-63, 64, v.shape, device="cuda").float() / 16 for v in views]
    avgs = [torch.zeros_like(v) for v in views]
    sqs = [torch.zeros_like(v) for v in views]
    want = [v.cpu().clone() for v in views]
    cuda_backend.update(views, grads, avgs, sqs, [1, 1], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.1)
    fresh = [[torch.zeros(v.shape) for v in views] for _ in range(2)]  # avgs and sqs are updated by now
    reference.update(want, [g.cpu() for g in grads], *fresh, [1, 1], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.1)
    for got, expected in zip(views, want):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-6)


@gpu
@pytest.mark.parametrize("mode", MODES)
def test_update_with_grad_scaler_and_clip(mode):
    check_update(cuda_backend, "cuda", mode, torch.float32, [(4097,), (7,)],
                 inv_scale=torch.full((), 1 / 1024, device="cuda"), found_inf=torch.zeros((), device="cuda"),
                 grad_coef=torch.full((), 0.37, device="cuda"))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_norms_match_reference(dtype):
    check_masked_norms(cuda_backend, "cuda", dtype)


@gpu
def test_found_inf_writes_nothing():
    check_found_inf(cuda_backend, "cuda")


@gpu
def test_tensors_the_kernels_do_not_take_follow_the_reference():
    check_fallback(cuda_backend, "cuda")


@gpu
def test_no_host_synchronisation():
    generator = torch.Generator().manual_seed(5)
    shapes = [(4097,), (7,)]
    params = [torch.randn(s, generator=generator).cuda() for s in shapes]
    grads = [torch.randn(s, generator=generator).cuda() for s in shapes]
    avgs, sqs, scores = ([torch.zeros_like(p) for p in params] for _ in range(3))
    found_inf, inv_scale = torch.zeros((), device="cuda"), torch.ones((), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            cuda_backend.update(params, grads, avgs, sqs, [1, 1], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.0, scores=scores, reset_scores=[False, False],
                                inv_scale=inv_scale, found_inf=found_inf)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("variant,masked,clip", [("dense", "grad", None), ("mix", "freeze", 0.5)])
def test_grad_scaler_sync_free_path_equals_host_synced_path(backend, variant, masked, clip):
    if backends.unavailable_reason(backend, "cuda") is not None:
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    assert_sync_free_matches_host_synced(backend, "cuda", variant=variant, masked=masked, clip=clip)


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_grad_scaler_step_does_not_synchronise(backend):
    """scaler.step(opt) + scaler.update() within a stage: no host sync. The
    previous step's found_inf is complete when each call starts, as in a loop
    whose CPU is at most one step ahead."""
    if backends.unavailable_reason(backend, "cuda") is not None:
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (4097, 7, 70000)]
    opt = DPSAdamW(params, stage_steps=100, backend=backend)
    scaler = torch.amp.GradScaler("cuda")
    for attempt in range(4):
        for param in params:
            param.grad = scaler.scale(torch.randn_like(param))
        if attempt == 2:
            params[0].grad[0] = float("inf")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert opt.state_dict()["param_groups"][0]["dps_step"] == 3  # the overflow was skipped


@gpu
def test_one_launch_per_step():
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (5, 4097, 70000, 1, 33)]
    opt = DPSAdamW(params, stage_steps=100, backend="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # warm-up: state and staging buffers
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if "update_kernel" in e.name]
    if not launches:
        pytest.skip("the profiler saw no kernels of the module")
    assert len(launches) == 1, [e.name for e in prof.events()]


@gpu
def test_a_tensor_past_2_to_the_31_entries():
    """64-bit indexing: an update and a selection over 2^31 + 4099 entries."""
    numel = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * 4 * numel + (2 << 30):
        pytest.skip(f"needs {5 * 4 * numel / 2**30:.0f} GiB of free GPU memory; {free / 2**30:.0f} GiB free")
    param = torch.randn(numel, device="cuda")
    grad = torch.randint(-63, 64, (numel,), device="cuda", dtype=torch.int8).float().div_(16)
    avg, sq, score = torch.zeros_like(param), torch.zeros_like(param), torch.ones_like(param)
    ends = [slice(0, 5000), slice(numel - 5000, numel)]
    want = [[t[s].cpu() for t in (param, grad, avg, sq, score)] for s in ends]
    cuda_backend.update([param], [grad], [avg], [sq], [1], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.1, scores=[score], reset_scores=[False])
    for s, (p, g, m, v, sc) in zip(ends, want):
        reference.update([p], [g], [m], [v], [1], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                         scores=[sc], reset_scores=[False])
        for got, expected in zip((param[s], avg[s], sq[s]), (p, m, v)):
            torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(score[s].cpu(), sc)
    del param, grad, avg, sq
    # the 1000 last entries score highest; k < 1000 of them are wanted, ties keep all 1000
    score.fill_(1.0)
    score[-1000:] = 2.0
    sparsity = 1 - 500 / numel
    assert selection.kept_count(numel, sparsity) <= 1000
    mask, = cuda_backend.select_masks([score], sparsity)
    assert mask.numel() == (numel + 7) // 8
    tail_bits = torch.zeros(5000, dtype=torch.bool)
    tail_bits[-1000:] = True
    head = mask[: (numel - 5000) // 8]
    assert int(head.count_nonzero()) == 0
    tail = selection.unpack_mask(mask[(numel - 5000) // 8:].cpu(), ((mask.numel() - (numel - 5000) // 8) * 8,))
    start = (numel - 5000) - (numel - 5000) // 8 * 8
    assert torch.equal(tail[start:start + 5000], tail_bits)
