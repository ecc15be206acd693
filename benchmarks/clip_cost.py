"""DPSAdamW.clip_grad_norm_ in an exploitation stage: what masking adds to a
gradient clip, measured side by side in one run.

    python benchmarks/clip_cost.py [--threads 1] [--rounds 15]

Tensors: the managed weights of one BERT-large layer (4 x 1024x1024,
4096x1024, 1024x4096: 12.6M entries), fp32, masks selected at sparsity 0.3.
Rows, each the total norm the clip needs:
- torch.nn.utils.get_total_norm of the raw gradients (what AdamW's clip
  costs: the floor);
- the same of grad * unpacked mask (clip_grad_norm_ before the masked-norm
  kernel; the torch backend now takes the same norm in float64, to round as the kernels do);
- DPSAdamW(backend="cpu").clip_grad_norm_ (one pass over each gradient and
  its mask bits in the compiled module).
"""
import argparse
import statistics
import time

import torch

from dps_fast import DPSAdamW, selection

SHAPES = [(1024, 1024)] * 4 + [(4096, 1024), (1024, 4096)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in SHAPES]
    opt = DPSAdamW(params, stage_steps=1, backend="cpu")
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    opt.step()  # an exploration step scores; the next step exploits
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    opt.clip_grad_norm_(1.0)  # selects the masks
    grads = [p.grad for p in params]
    masks = [opt.state[p]["mask"] for p in params]
    rows = {
        "raw gradients (torch, AdamW's clip)": lambda: torch.nn.utils.get_total_norm(grads),
        "grad * unpacked mask (torch)": lambda: torch.nn.utils.get_total_norm(
            [g * selection.unpack_mask(m, g.shape) for g, m in zip(grads, masks)]),
        "DPSAdamW cpu clip_grad_norm_ (kernel)": lambda: opt.clip_grad_norm_(1.0),
    }
    norms = {name: run().item() for name, run in rows.items()}
    times = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    names = list(rows)
    print(f"{sum(p.numel() for p in params) / 1e6:.1f}M entries, {args.threads} thread(s), "
          f"median of {args.rounds} paired rounds")
    for name in names:
        print(f"  {name:<40} {statistics.median(times[name]) * 1e3:8.2f} ms   norm {norms[name]:.4f}")
    speedup = [old / new for old, new in zip(times[names[1]], times[names[2]])]
    print(f"  kernel vs unpacked mask: {statistics.median(speedup):.2f}x faster (median paired ratio)")


if __name__ == "__main__":
    main()
