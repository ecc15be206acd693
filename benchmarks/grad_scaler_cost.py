"""What DPSAdamW's sync-free GradScaler path (dps_fast.amp) costs or saves per
step, against GradScaler's host-synced path (found_inf read on the host every
step), measured side by side in one run.

    python benchmarks/grad_scaler_cost.py [--device cpu|cuda] [--tensors 200] [--numel 1024]

Each step: scaled gradients, scaler.step(opt), scaler.update(). Rounds of
10 steps alternate between the two paths; a round ends with a device
synchronisation, so on a GPU the host-synced path's per-step waits show in
the wall time. On the CPU nothing waits, and what shows is the host-side
bookkeeping of the sync-free path (its undo record).
"""
import argparse
import statistics
import time

import torch

from dps_fast import DPSAdamW


def make_loop(sync_free, device, tensors, numel):
    params = [torch.nn.Parameter(torch.randn(numel, device=device)) for _ in range(tensors)]
    opt = DPSAdamW(params, stage_steps=10**6)  # within one exploration stage
    if not sync_free:
        opt._step_supports_amp_scaling = False  # GradScaler reads found_inf and skips step() itself
    scaler = torch.amp.GradScaler(torch.device(device).type)
    grads = [torch.randn_like(p) for p in params]

    def step():
        for param, grad in zip(params, grads):
            param.grad = scaler.scale(grad)
        scaler.step(opt)
        scaler.update()

    return step


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--numel", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loops = {name: make_loop(name == "sync-free", args.device, args.tensors, args.numel)
             for name in ("host-synced", "sync-free")}
    for loop in loops.values():  # warm-up: state, kernels
        for _ in range(5):
            loop()
    times = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, loop in loops.items():
            sync(args.device)
            start = time.perf_counter()
            for _ in range(10):
                loop()
            sync(args.device)
            times[name].append((time.perf_counter() - start) / 10)
    ratios = [free / synced for free, synced in zip(times["sync-free"], times["host-synced"])]
    print(f"{args.device}: {args.tensors} tensors x {args.numel} entries, {args.rounds} rounds of 10 steps, "
          f"{args.threads} CPU thread(s)")
    for name, values in times.items():
        print(f"  {name:<12} median {statistics.median(values) * 1e3:.3f} ms per step")
    print(f"  sync-free / host-synced: median paired ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
