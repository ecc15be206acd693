"""Shared check: DPSAdamW under a GradScaler takes the same steps on its
sync-free path (the default: found_inf read on the device, dps_fast.amp) as on
GradScaler's host-synced path (the scaler reads found_inf and skips step()).

Overflows are placed where a skip matters most with stage_steps=2: the first
call (no state yet), two in a row at what would be an exploitation stage's
first step (the selection), an exploration stage's first step (the score
reset), and an exploitation step. The scale also grows every 3 clean steps,
so the unscale factor changes.
"""
import torch
import torch.nn.functional as F

from dps_fast import DPSAdamW, param_groups
from training import assert_same_state, tiny_model

ATTEMPTS = 14
OVERFLOWS = (1, 4, 5, 8, 12)  # step() calls whose gradients hold an inf


def train(backend, sync_free, device="cpu", variant="dense", masked="grad", clip=None):
    """ATTEMPTS scaled steps; returns (parameters after each call, final state_dict).

    clip: None (the kernels unscale) or a max norm (scaler.unscale_(opt), then
    opt.clip_grad_norm_, as the README prescribes)."""
    model = tiny_model().to(device)
    opt = DPSAdamW(param_groups(model), lr=1e-2, stage_steps=2, variant=variant, masked=masked, backend=backend)
    if not sync_free:
        opt._step_supports_amp_scaling = False  # GradScaler then syncs and skips step() itself
    if variant == "mix":
        opt.attach_mix(model)
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0**10, growth_interval=3)
    torch.manual_seed(1)  # the mixing draws
    trace = []
    for attempt in range(1, ATTEMPTS + 1):
        generator = torch.Generator().manual_seed(attempt)
        tokens = torch.randint(0, 16, (8, 8), generator=generator)
        labels = (tokens[:, 0] > 7).long()
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(tokens.to(device)), labels.to(device))).backward()
        if attempt in OVERFLOWS:
            model.pooler.weight.grad[0, 0] = float("inf")
        if clip is not None:
            scaler.unscale_(opt)
            opt.clip_grad_norm_(clip)
        scaler.step(opt)
        scaler.update()
        trace.append([p.detach().clone() for p in model.parameters()])
    return trace, opt.state_dict()


def assert_sync_free_matches_host_synced(backend, device="cpu", **case):
    """Parameters after every call, and the final state, equal to the bit."""
    want_trace, want_state = train(backend, False, device, **case)
    got_trace, got_state = train(backend, True, device, **case)
    for attempt, (want, got) in enumerate(zip(want_trace, got_trace), start=1):
        for i, (a, b) in enumerate(zip(want, got)):
            assert torch.equal(a, b), f"call {attempt}, parameter {i}"
    assert got_state["param_groups"] == want_state["param_groups"]
    assert_same_state(got_state["state"], want_state["state"])
