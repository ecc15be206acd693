"""The compiled CUDA backend.

Everywhere (CI included): the build produced the module when nvcc is present,
it imports without a GPU, using it without a driver raises a clear
RuntimeError, and the host-side bias correction rounds as torch's CUDA
kernels do. On a GPU: the parity harness and the direct checks of
backend_checks.py against the reference, unaligned tensors, no host
synchronisation (torch's and the module's own), work queued on the caller's
stream, one launch per step, and a tensor of more than 2^31 entries (64-bit
indexing).

Where torch sees no GPU, the GPU tests skip with the reason the backend gives;
where torch sees one but the backend cannot run (the module failed to build
or import, a driver too old), they fail (an error at setup) with that reason."""
import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from backend_checks import (DTYPES, MODES, SIZES, STORAGES, check_fallback, check_found_inf,
                            check_masked_norms, check_masked_out_inf, check_refuses_8bit, check_select,
                            check_select_many, check_stochastic_stores, check_update)
from backend_parity import assert_matches_reference, cases
from scaler_checks import assert_sync_free_matches_host_synced
from dps_fast import DPSAdamW, backends, selection
from dps_fast.backends import reference
from dps_fast.toolchain import find_nvcc

MODULE = "dps_fast._cuda_kernels"
CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"


def _import_module():
    """(module, None) or (None, why it does not import)."""
    try:
        return importlib.import_module(MODULE), None
    except ImportError as error:
        return None, f"{MODULE} does not import ({error})"


KERNELS, IMPORT_ERROR = _import_module()
cuda_backend = importlib.import_module("dps_fast.backends.cuda")
REASON = cuda_backend.unavailable_reason(torch.device("cuda"))  # None where the backend runs
TORCH_SEES_A_GPU = torch.cuda.is_available() and not torch.version.hip


@pytest.fixture
def _backend_runs_where_torch_sees_a_gpu():
    pytest.fail(f"torch sees {torch.cuda.get_device_name()} but the CUDA backend cannot run: {REASON}")


if REASON is None:
    gpu = pytest.mark.usefixtures()
elif TORCH_SEES_A_GPU:
    gpu = pytest.mark.usefixtures("_backend_runs_where_torch_sees_a_gpu")
else:
    gpu = pytest.mark.skip(reason=f"no GPU the CUDA backend can use: {REASON}")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
built = pytest.mark.skipif(KERNELS is None, reason=str(IMPORT_ERROR))


# ----- everywhere ---------------------------------------------------------------------

@pytest.mark.skipif(find_nvcc() is None or os.environ.get("DPS_FAST_CUDA", "auto") == "0",
                    reason="no nvcc here (or DPS_FAST_CUDA=0): the CUDA module is not expected")
def test_module_is_built_when_nvcc_is_present():
    assert KERNELS is not None, (f"nvcc is at {find_nvcc()} but {IMPORT_ERROR}; "
                                 "reinstall with `pip install -v .` and read the dps_fast warnings")


@built
def test_module_describes_itself():
    archs = KERNELS.archs.split(",")
    assert archs and all(a.isdigit() for a in archs), KERNELS.archs  # explicit architectures, never 'native'
    assert KERNELS.runtime_version >= 11000


@built
@no_gpu
def test_without_a_driver_it_raises_a_clear_error():
    module = KERNELS
    reason = module.unavailable_reason()
    assert reason and ("driver" in reason or "GPU" in reason), reason
    with pytest.raises(RuntimeError, match="cannot run"):
        module.device_count()
    with pytest.raises(RuntimeError, match="cannot run"):  # checked before any address is touched
        module.update(0, 0, 0, 0, 0, False, [1], [1], [1], [1], [], [], [4], [1], [], [], [], [], 1e-3, 0.9, 0.999,
                      1e-8, 0.0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="cannot run"):
        module.select(0, 0, [1], [1], [4], [1])
    assert reason in cuda_backend.unavailable_reason(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        backends.resolve("cuda", "cuda")


def test_gpu_tests_give_the_reason_when_the_module_does_not_import(tmp_path):
    """With the module made unimportable, a GPU test skips (no GPU) or fails at
    setup (torch sees one) with the import error as its reason, not a generic
    'needs a GPU'."""
    (tmp_path / "hide_cuda_module.py").write_text(f"import sys\nsys.modules[{MODULE!r}] = None\n")
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider",
                             "-p", "hide_cuda_module", f"{__file__}::test_auto_picks_the_cuda_backend"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert f"import of {MODULE} halted" in result.stdout, result.stdout[-3000:]  # the ImportError, passed on
    assert "needs a GPU" not in result.stdout
    assert ("1 error" if TORCH_SEES_A_GPU else "1 skipped") in result.stdout, result.stdout[-3000:]


# dps_math.h's make_step, compiled by the host compiler: its bias corrections for steps 1..2000.
_MAKE_STEP_PROBE = r"""
#include <stdio.h>
#include <string.h>
#include "dps_math.h"
int main() {
  for (long long step = 1; step <= 2000; ++step) {
    dps::StepConsts s = dps::make_step(1e-3, 0.9, 0.999, step);
    uint32_t b, inv;
    memcpy(&b, &s.bias2_sqrt, 4);
    memcpy(&inv, &s.inv_bias2_sqrt, 4);
    printf("%u %u\n", b, inv);
  }
}
"""


def test_bias_correction_rounds_as_torch_cuda_divides(tmp_path):
    """reference.adamw_math divides by the Python float b = (1 - beta2**step) ** 0.5;
    on CUDA torch computes that as a multiplication by 1.0f / (float)b (its
    BinaryDivTrueKernel.cu), and the kernel's inv_bias2_sqrt must be that fp32 value,
    not the double inverse rounded once (1 ulp apart at 446 of these steps)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler here")
    source = tmp_path / "probe.cpp"
    source.write_text(_MAKE_STEP_PROBE)
    subprocess.run([compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-fno-math-errno", f"-I{CSRC}",
                    str(source), "-o", str(tmp_path / "probe")], check=True, capture_output=True, timeout=120)
    lines = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True, text=True).stdout.split()
    got = np.array(lines, dtype=np.uint32).reshape(-1, 2).view(np.float32)
    steps = np.arange(1, 2001)
    b = np.array([(1 - 0.999**int(step)) ** 0.5 for step in steps])  # the reference's Python floats
    torch_cuda = np.float32(1.0) / b.astype(np.float32)
    assert np.array_equal(got[:, 0], b.astype(np.float32))
    assert np.array_equal(got[:, 1], torch_cuda)
    assert (torch_cuda != (1.0 / b).astype(np.float32)).sum() == 446  # the rule matters at these steps


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
@pytest.mark.parametrize("numel", SIZES)
def test_select_masks_matches_reference(numel, kind):
    check_select(cuda_backend, "cuda", numel, kind)


@gpu
@pytest.mark.parametrize("kind", ["random", "tied", "equal", "signed"])
def test_select_masks_of_several_select_chunks(kind):
    check_select(cuda_backend, "cuda", 3 * KERNELS.select_chunk_entries + 33, kind)


@gpu
def test_select_masks_of_many_tensors():
    check_select_many(cuda_backend, "cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_update_matches_reference(mode, dtype):
    chunk = KERNELS.update_chunk_entries
    check_update(cuda_backend, "cuda", mode, dtype, [(2 * chunk + 37,), (7,), (0,), (1,), (33, 17), (4097,)])


@gpu
@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: "-".join(s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_update_with_compact_state_and_stochastic_rounding(mode, dtype, storage):
    chunk = KERNELS.update_chunk_entries
    check_update(cuda_backend, "cuda", mode, dtype, [(2 * chunk + 37,), (7,), (0,), (1,), (33, 17)],
                 state_format=storage[0], rounding=storage[1])


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
def test_8bit_state_is_refused():
    check_refuses_8bit(cuda_backend, "cuda")


@gpu
def test_masked_out_inf_gradient_gives_nan_as_the_reference():
    check_masked_out_inf(cuda_backend, "cuda", [(7,), (4097,)], index=1)


@gpu
def test_tensors_the_kernels_do_not_take_follow_the_reference():
    check_fallback(cuda_backend, "cuda")


class _SyncDebugError:
    """A window in which torch raises at any host synchronisation."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)


class _NoHostWaits(_SyncDebugError):
    """The same, and the module's own waits (staging buffers allocated or freed,
    events waited on: staging.cu's Staging::acquire) stay put."""

    def __enter__(self):
        self.waits = KERNELS.host_waits()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if exc[0] is None:
            assert KERNELS.host_waits() == self.waits, "the CUDA module waited for the GPU"


def _warm_up(calls):
    """Run calls() once behind a GPU sleep: every staging slot it takes is then
    still busy when the next call comes, so the module sets up as many slots
    as the calls could ever need in flight, and the same calls later (after a
    synchronisation) have no reason to allocate."""
    torch.cuda.synchronize()
    torch.cuda._sleep(2 * 10**8)  # about 0.1 s at 2 GHz
    calls()
    torch.cuda.synchronize()


@gpu
def test_no_host_synchronisation():
    generator = torch.Generator().manual_seed(5)
    shapes = [(4097,), (7,)]
    params = [torch.randn(s, generator=generator).cuda() for s in shapes]
    grads = [torch.randn(s, generator=generator).cuda() for s in shapes]
    avgs, sqs, scores = ([torch.zeros_like(p) for p in params] for _ in range(3))
    found_inf, inv_scale = torch.zeros((), device="cuda"), torch.ones((), device="cuda")

    def calls():
        for _ in range(3):
            cuda_backend.update(params, grads, avgs, sqs, [1, 1], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.0, scores=scores, reset_scores=[False, False],
                                inv_scale=inv_scale, found_inf=found_inf)
        masks = cuda_backend.select_masks(scores, 0.3)
        cuda_backend.masked_norms(grads, masks)
        cuda_backend.update(params, grads, avgs, sqs, [2, 2], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                            weight_decay=0.0, masks=masks)

    _warm_up(calls)
    with _NoHostWaits():
        calls()


@gpu
def test_work_is_queued_on_the_current_stream():
    """On a side stream, the module's kernels run behind what that stream already
    holds (a long sleep here), while the default stream does not wait for them."""
    generator = torch.Generator().manual_seed(8)
    shapes = [(4097,), (7,), (70000,)]
    start = [torch.randn(s, generator=generator) for s in shapes]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    side = torch.cuda.Stream()

    def run(sleep):
        params = [p.cuda() for p in start]
        avgs, sqs = ([torch.zeros_like(p) for p in params] for _ in range(2))
        on_gpu = [g.cuda() for g in grads]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if sleep:
                torch.cuda._sleep(10**9)  # about half a second at 2 GHz
            cuda_backend.update(params, on_gpu, avgs, sqs, [1, 1, 1], **hyper)
            masks = cuda_backend.select_masks(on_gpu, 0.3)
        return params, masks

    run(sleep=False)  # warm-up: staging buffers
    torch.cuda.synchronize()
    params, masks = run(sleep=True)
    early = [p.cpu() for p in params]  # read on the default stream, while the side stream sleeps
    assert not side.query(), "the side stream finished early: the sleep was too short to tell"
    for got, want in zip(early, start):
        assert torch.equal(got, want), "the update ran before the work queued ahead of it on its stream"
    side.synchronize()
    want = [p.clone() for p in start]
    fresh = [[torch.zeros(s) for s in shapes] for _ in range(2)]
    reference.update(want, grads, *fresh, [1, 1, 1], **hyper)
    for got, expected in zip(params, want):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-6)
    for got, expected in zip(masks, reference.select_masks(grads, 0.3)):
        assert torch.equal(got.cpu(), expected)


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
    """scaler.step(opt) + scaler.update() within a stage: no host sync (nor, for
    the cuda backend, a wait of its own). The previous step's found_inf is
    complete when each call starts, as in a loop whose CPU is at most one step
    ahead. The first step runs outside the window: it creates the state, and
    Triton autotunes there (autotuning synchronises)."""
    if backends.unavailable_reason(backend, "cuda") is not None:
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (4097, 7, 70000)]
    opt = DPSAdamW(params, stage_steps=100, backend=backend)
    scaler = torch.amp.GradScaler("cuda")

    def step():
        scaler.step(opt)
        scaler.update()

    for attempt in range(5):
        for param in params:
            param.grad = scaler.scale(torch.randn_like(param))
        if attempt == 3:
            params[0].grad[0] = float("inf")
        if attempt == 0:
            _warm_up(step)
            continue
        with _NoHostWaits() if backend == "cuda" else _SyncDebugError():
            step()
    assert opt.state_dict()["param_groups"][0]["dps_step"] == 4  # the overflow was skipped


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
    names = [e.name for e in prof.events()]
    launches = [name for name in names if "update_kernel" in name]
    assert len(launches) == 1, f"update kernels seen by the profiler: {launches}; all events: {names}"


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


@gpu
def test_stochastic_stores_are_the_references_to_the_bit():
    check_stochastic_stores(cuda_backend, "cuda")
