"""The DPS schedule (dps_fast/schedule.py): stage arithmetic, and the phases and
masks an optimizer follows, including a stage length changed mid-run."""
import math

import torch
from torch import nn

from dps_fast import DPSAdamW, param_groups
from dps_fast.schedule import phase_of, stage_of, stage_start
from training import tiny_model, train_step


def test_stage_names_are_first_steps_and_never_reused():
    assert [stage_start(s, 3) for s in (1, 3, 4, 6, 7)] == [1, 1, 4, 4, 7]
    # a new schedule that began after 5 steps: stages 6-7, 8-9, ...
    assert [stage_of(s, 2, start=5) for s in (6, 7, 8)] == [1, 1, 2]
    assert [phase_of(s, 2, start=5) for s in (6, 8)] == ["explore", "exploit"]
    assert [stage_start(s, 2, start=5) for s in (6, 7, 8, 9)] == [6, 6, 8, 8]


def test_stage_arithmetic_matches_spec_example():
    # T = 23: steps 1-23 explore, 24-46 exploit, 47-69 explore
    assert [stage_of(s, 23) for s in (1, 23, 24, 46, 47, 69, 70)] == [1, 1, 2, 2, 3, 3, 4]
    assert [phase_of(s, 23) for s in (1, 23, 24, 46, 47)] == ["explore"] * 2 + ["exploit"] * 2 + ["explore"]


def test_stage_steps_from_total_steps():
    param = nn.Parameter(torch.zeros(3))
    assert DPSAdamW([param], total_steps=468, stage_ratio=0.05).param_groups[0]["stage_steps"] == 23


def test_phase_and_mask_follow_optimizer_steps():
    model = tiny_model()
    opt = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2)
    weight = model.pooler.weight
    phases = []
    for step in range(1, 8):
        phases.append(opt.phase)
        train_step(model, opt, step)
        if step < 3:
            assert opt.mask(weight) is None
        else:
            mask = opt.mask(weight)
            assert mask.shape == weight.shape and mask.dtype == torch.bool
            assert mask.sum() >= math.ceil(weight.numel() * 0.7)
    assert phases == ["explore", "explore", "exploit", "exploit", "explore", "explore", "exploit"]
    assert opt.mask(model.pooler.bias) is None  # unmanaged


def test_a_new_stage_length_starts_a_new_schedule():
    param = nn.Parameter(torch.zeros(3))
    opt = DPSAdamW([param], stage_steps=2, backend="torch")
    phases = []
    for step in range(8):
        if step == 3:  # mid-exploitation (steps 3-4)
            opt.param_groups[0]["stage_steps"] = 1
        phases.append(opt.phase)
        param.grad = torch.ones(3)
        opt.step()
    # the new schedule begins after the 3 steps taken: explore (4), exploit (5), explore (6), ...
    assert phases == ["explore", "explore", "exploit", "explore", "exploit", "explore", "exploit", "explore"]
