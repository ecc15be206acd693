"""The small runs that benchmarks/gpu_check.sh puts under compute-sanitizer.

    python benchmarks/sanitizer_cases.py memcheck   # every kernel of the CUDA module
    python benchmarks/sanitizer_cases.py racecheck  # the kernels with shared memory

memcheck: DPSAdamW(backend="cuda") on tensors of odd sizes (0, 1, 7, 4097, a
2-D one, several chunks), a DPS group and a plain one ("dps": False, the
plain-mode kernel), for fp32, bf16 and fp16, masked "grad" and "freeze",
without a GradScaler (clip_grad_norm_: the masked-norm kernel) and with one
(scaler.step: inv_scale and found_inf read by the kernel, one overflow
step); each through explore, a boundary (selection), exploit and an
exploration stage's score reset; then select_masks on odd and unaligned
score tensors. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor is
then its own allocation, so an access past a tensor's end is outside any
allocation and memcheck sees it.

racecheck: the selection (shared-memory histograms) on many ties, and the
masked norms (a shared-memory block sum).

A case that raises is reported and the others still run; the exit status is
1 if any case failed (compute-sanitizer's --error-exitcode reports its own).
"""
import argparse
import sys
import traceback

import torch

from dps_fast import DPSAdamW, selection
from dps_fast.backends import cuda

MANAGED_SHAPES = [(0,), (1,), (7,), (4097,), (33, 17), (2 * 16384 + 5,)]
PLAIN_SHAPES = [(3,), (5, 7), (16384 + 1,)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def optimizer_run(dtype, masked, scaled, device="cuda", backend="cuda", state_dtype="fp32", rounding="nearest"):
    """Six steps of DPSAdamW(backend=backend): explore, explore, boundary + exploit,
    exploit, explore (the score reset), explore."""
    generator = torch.Generator(device=device).manual_seed(0)

    def param(shape):
        return torch.nn.Parameter(torch.randn(shape, device=device, generator=generator).to(dtype))

    managed, plain = [param(s) for s in MANAGED_SHAPES], [param(s) for s in PLAIN_SHAPES]
    opt = DPSAdamW([{"params": managed}, {"params": plain, "dps": False}], stage_steps=2, masked=masked,
                   backend=backend, state_dtype=state_dtype, rounding=rounding)
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0**8) if scaled else None
    for step in range(6):
        for p in managed + plain:
            p.grad = torch.randn(p.shape, device=device, generator=generator).to(dtype)
        if scaler is None:
            opt.clip_grad_norm_(1.0)  # masked norms in the exploitation steps
            opt.step()
        else:
            for p in managed + plain:
                p.grad = scaler.scale(p.grad)
            if step == 3:
                managed[3].grad[0] = float("inf")  # a skipped step: found_inf set
            scaler.step(opt)
            scaler.update()


def _select_run():
    scores = [torch.rand(n, device="cuda") for n in (0, 1, 7, 31, 33, 4097, 3 * 65536 + 5)]
    scores.append(torch.zeros(4099, device="cuda")[3:])  # unaligned view, all tied
    cuda.select_masks(scores, 0.3)


def memcheck_cases():
    for dtype in DTYPES:
        for masked in ("grad", "freeze"):
            for scaled in (False, True):
                name = f"DPSAdamW {str(dtype).replace('torch.', '')} masked={masked} " + \
                       ("GradScaler" if scaled else "clip_grad_norm_")
                yield name, lambda d=dtype, m=masked, s=scaled: optimizer_run(d, m, s)
        for masked in ("grad", "freeze"):  # bf16 state and stochastic stores (16-bit state vectors)
            yield (f"DPSAdamW {str(dtype).replace('torch.', '')} masked={masked} bf16 state, stochastic",
                   lambda d=dtype, m=masked: optimizer_run(d, m, False, state_dtype="bf16", rounding="stochastic"))
    yield "select_masks on odd and unaligned scores", _select_run


def racecheck_cases():
    def select():
        scores = [torch.randint(0, 3, (n,), device="cuda").float() for n in (1, 4097, 65536 + 7)]
        cuda.select_masks(scores, 0.3)

    def norms():
        grads = [torch.randn(n, device="cuda") for n in (7, 16384 * 3 + 1)]
        masks = [selection.pack_mask(torch.rand(g.shape, device="cuda") < 0.7) for g in grads]
        cuda.masked_norms(grads, masks)

    yield "select_masks with many ties", select
    yield "masked_norms", norms


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=("memcheck", "racecheck"))
    args = parser.parse_args()
    reason = cuda.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        sys.exit(f"the CUDA backend cannot run here: {reason}")
    failed = 0
    for name, run in (memcheck_cases() if args.tool == "memcheck" else racecheck_cases()):
        try:
            run()
            torch.cuda.synchronize()
            print(f"case ok: {name}", flush=True)
        except Exception:  # report it, run the others
            failed += 1
            print(f"case FAILED: {name}\n{traceback.format_exc()}", flush=True)
    print(f"{args.tool} cases: {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
