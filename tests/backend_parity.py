"""Shared check that a fast backend's DPSAdamW equals the torch backend's.

Each case drives two optimizers (the backend under test and backend="torch")
with the same synthetic gradients for several stages and compares, after
every step, parameters, moments, scores and packed masks.

Gradients are multiples of 1/16 below 4 in magnitude, so squares and their
sums are exact in fp32: scores (and so masks) must be bit-identical however a
kernel orders or fuses its arithmetic, and they tie often, which exercises
the keep-ties rule.
"""
import torch

from dps_fast import DPSAdamW
from training import grid_grad
from dps_fast.mix import record_keep

# (name, shapes of managed tensors, shapes of plain AdamW tensors)
SIZES = [
    ("0", [(0,)], []),
    ("1", [(1,)], []),
    ("7", [(7,)], []),
    ("4097", [(4097,)], []),
    ("mixed", [(33, 17), (4097,), (1,), (0, 3), (7,), (64, 65)], [(5,), (3, 9)]),
]


def cases(quick=False, stochastic=True):
    """Keyword sets for assert_matches_reference, named for pytest ids.

    quick=True keeps one case per feature (for slow backends such as the
    Triton interpreter). stochastic=False leaves out the cases whose stores
    round stochastically: over many steps they need the kernels' fp32 results
    to be torch's to the bit (a 1-ulp difference moves a stochastic rounding
    now and then, and the run drifts by a bf16 ulp from there), which holds
    where both round alike, not for kernels built for another CPU than torch's."""
    out = []
    for name, managed, plain in SIZES:
        for variant in ("dense", "mix"):
            for masked in ("grad", "freeze"):
                if quick and name != "mixed" and (variant, masked) != ("dense", "grad"):
                    continue
                out.append((f"{name}-{variant}-{masked}",
                            dict(managed=managed, plain=plain, variant=variant, masked=masked)))
    mixed = dict(managed=SIZES[-1][1], plain=SIZES[-1][2])
    out += [
        ("mixed-inf-steps", dict(mixed, inf_steps=(2, 4, 5, 9))),
        ("mixed-clip", dict(mixed, clip=0.5)),
        ("mixed-mix-freeze-clip-inf", dict(mixed, variant="mix", masked="freeze", clip=0.5, inf_steps=(4, 7))),
        ("mixed-bf16", dict(mixed, dtype=torch.bfloat16)),
        ("mixed-fp16-freeze", dict(mixed, dtype=torch.float16, masked="freeze")),
        # clip norms of low-precision gradients: rounded to their dtype, as torch rounds them, in every phase
        ("mixed-bf16-clip", dict(mixed, dtype=torch.bfloat16, clip=0.5)),
        ("200x50-fp16-clip", dict(managed=[(200, 50)], plain=[], dtype=torch.float16, clip=1.0, stage_steps=1,
                                  steps=4)),
    ]
    if stochastic:  # compact state and stochastic stores: the same random bits on every backend
        out += [
            ("mixed-bf16-state", dict(mixed, state_dtype="bf16")),
            ("mixed-bf16-stochastic-clip", dict(mixed, dtype=torch.bfloat16, state_dtype="bf16",
                                                rounding="stochastic", clip=0.5)),
            ("mixed-fp16-stochastic-freeze", dict(mixed, dtype=torch.float16, rounding="stochastic",
                                                  masked="freeze")),
        ]
    return out


def run(backend, managed, plain, *, variant="dense", masked="grad", dtype=torch.float32, device="cpu",
        steps=14, stage_steps=3, sparsity=0.3, inf_steps=(), clip=None, seed=0, state_dtype="fp32",
        rounding="nearest"):
    """Train synthetic tensors for `steps` steps; returns one snapshot per step:
    {name: tensor} for every parameter and state tensor, and the clip's total norm."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda shape: (torch.randn(shape, generator=generator)).to(device, dtype)  # noqa: E731
    managed_params = [make(s).requires_grad_() for s in managed]
    plain_params = [make(s).requires_grad_() for s in plain]
    groups = [{"params": managed_params}]
    if plain_params:
        groups.append({"params": plain_params, "dps": False, "weight_decay": 0.0})
    opt = DPSAdamW(groups, lr=1e-2, weight_decay=0.1, sparsity=sparsity, stage_steps=stage_steps,
                   variant=variant, masked=masked, backend=backend, state_dtype=state_dtype, rounding=rounding,
                   seed=seed)
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=1024.0) if inf_steps else None
    params = managed_params + plain_params
    trace = []
    for step in range(1, steps + 1):
        grads = [grid_grad(shape, generator) for shape in managed + plain]
        if variant == "mix":  # what a mixed forward/backward would have recorded
            exploring = opt.phase == "explore"
            for param, grad in zip(managed_params, grads):
                keep = None
                if exploring:
                    keep = (torch.rand(param.shape[-1:] if param.dim() == 2 else param.shape,
                                       generator=generator) < 1 - sparsity).float()
                    grad.mul_(keep)
                record_keep(opt.state[param], None if keep is None else keep.to(device))
        for param, grad in zip(params, grads):
            param.grad = grad.to(device, dtype)
        if scaler is not None:
            for param in params:  # as if the loss had been scaled before backward
                param.grad = scaler.scale(param.grad)
            if step in inf_steps:
                next(p for p in params if p.numel()).grad.view(-1)[0] = float("inf")
            scaler.unscale_(opt)
        norm = opt.clip_grad_norm_(clip) if clip is not None else None
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        snapshot = {} if norm is None else {"clip_norm": norm}
        for i, param in enumerate(params):
            snapshot[f"param{i}"] = param.detach().clone()
            for key, value in opt.state[param].items():
                if isinstance(value, torch.Tensor):
                    snapshot[f"param{i}.{key}"] = value.clone()
        trace.append(snapshot)
    return trace


def assert_matches_reference(backend, device="cpu", **case):
    """Run `case` with `backend` and with backend="torch" and compare every step:
    masks, scores and clip norms exactly, floats to 1e-6 relative (fp32) or 1 ulp (bf16/fp16)."""
    expected = run("torch", device=device, **case)
    actual = run(backend, device=device, **case)
    dtype = case.get("dtype", torch.float32)
    for step, (want, got) in enumerate(zip(expected, actual), start=1):
        assert want.keys() == got.keys(), f"step {step}: state keys differ"
        for name, value in want.items():
            message = f"{backend} vs torch, step {step}, {name}"
            if name.endswith((".mask", ".score", ".mix_count", "clip_norm")) or not value.is_floating_point():
                assert torch.equal(got[name].cpu(), value.cpu()), message
            elif value.dtype == torch.float32:
                torch.testing.assert_close(got[name].cpu(), value.cpu(), rtol=1e-6, atol=1e-6, msg=message)
            else:  # a low-precision parameter or moment: the fp32 result rounded, 1 ulp apart at most
                ulp = torch.finfo(value.dtype).eps
                torch.testing.assert_close(got[name].float().cpu(), value.float().cpu(), rtol=ulp, atol=ulp,
                                           msg=message)
