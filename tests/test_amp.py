"""GradScaler without a host sync (dps_fast/amp.py): a skipped step changes
nothing, the sync-free path equals the host-synced one to the bit, and where
the host reads found_inf."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dps_fast import DPSAdamW, amp, param_groups
from scaler_checks import assert_sync_free_matches_host_synced
from training import batch, tiny_model


def test_grad_scaler_inf_step_changes_nothing():
    model = tiny_model()
    opt = DPSAdamW(param_groups(model), lr=1e-2, stage_steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(1, 5):
        tokens, labels = batch(step)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(tokens), labels)).backward()
        if step == 3:  # first exploitation step gets an inf
            model.pooler.weight.grad[0, 0] = float("inf")
            params = [p.detach().clone() for p in model.parameters()]
            state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                     for p, s in opt.state.items()}
            steps = [g["dps_step"] for g in opt.param_groups]
        scaler.unscale_(opt)
        opt.clip_grad_norm_(1.0)
        scaler.step(opt)
        scaler.update()
        if step == 3:
            saved = opt.state_dict()  # reads the step's found_inf (dps_fast.amp)
            assert [g["dps_step"] for g in saved["param_groups"]] == steps
            assert [g["dps_step"] for g in opt.param_groups] == steps
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
            for param in opt.state:
                saved, now = state[id(param)], opt.state[param]
                # the mask may have been selected (from unchanged scores) for clipping; nothing else moved
                assert set(now) - set(saved) <= {"mask", "mask_stage"}
                for key, value in saved.items():
                    same = torch.equal(value, now[key]) if isinstance(value, torch.Tensor) else value == now[key]
                    assert same, key
    assert opt.param_groups[0]["dps_step"] == 3


def test_grad_scaler_skipped_first_step_leaves_no_state():
    param = nn.Parameter(torch.ones(4))
    opt = DPSAdamW([param], stage_steps=2)
    scaler = torch.amp.GradScaler("cpu")
    param.grad = scaler.scale(torch.tensor([1.0, float("inf"), 0.0, 0.0]))
    scaler.step(opt)
    saved = opt.state_dict()
    assert saved["state"] == {} and saved["param_groups"][0]["dps_step"] == 0 and not opt.state
    assert torch.equal(param, torch.ones(4))


def test_grad_scaler_step_without_gradients_is_a_plain_step():
    param = nn.Parameter(torch.ones(4))
    opt = DPSAdamW([param], stage_steps=2)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # the scale exists, but no parameter has a gradient
    scaler.step(opt)  # as opt.step() with no gradients: nothing to update
    assert torch.equal(param, torch.ones(4)) and not opt.state_dict()["state"]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("variant,masked,clip", [("dense", "grad", None), ("dense", "freeze", 0.5),
                                                  ("mix", "grad", 0.5), ("mix", "freeze", None)])
def test_grad_scaler_sync_free_path_equals_host_synced_path(backend, variant, masked, clip):
    assert_sync_free_matches_host_synced(backend, variant=variant, masked=masked, clip=clip)


@pytest.mark.parametrize("variant", ["dense", "mix"])
def test_grad_scaler_found_inf_is_read_at_the_next_step_or_at_a_stage_boundary(monkeypatch, variant):
    """Where the host reads a step's found_inf: in the next step(), or earlier
    only when a schedule query (the clip's masks, DPS-Mix's forward) would
    differ had the step been skipped, i.e. when the next step starts a stage."""
    reads, where = [], ["forward"]
    skipped = amp.ScaledStep.skipped
    monkeypatch.setattr(amp.ScaledStep, "skipped", lambda self: reads.append(where[0]) or skipped(self))
    model = tiny_model()
    opt = DPSAdamW(param_groups(model), lr=1e-2, stage_steps=3, variant=variant)
    if variant == "mix":
        opt.attach_mix(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(1, 11):
        tokens, labels = batch(step)
        opt.zero_grad()
        where[0] = "forward"
        loss = F.cross_entropy(model(tokens), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        where[0] = "clip"
        opt.clip_grad_norm_(1.0)
        where[0] = "step"
        scaler.step(opt)
        scaler.update()
    first_of_stage = "forward" if variant == "mix" else "clip"
    assert reads == [first_of_stage if step in (4, 7, 10) else "step" for step in range(2, 11)]
    where[0] = "state_dict"
    assert opt.state_dict()["param_groups"][0]["dps_step"] == 10
    assert reads[-1] == "state_dict" and len(reads) == 10  # the last step's found_inf, read for the state_dict
