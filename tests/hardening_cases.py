"""Hostile inputs for the fast backends, one function per case (tests/test_hardening.py
runs each in its own subprocess with a time limit, so that a crash or a hang fails one
test). Each case takes a backend name; it raises AssertionError on a wrong result or a
missing error, and returns normally when the backend gives the reference backend's
result or a clear ValueError. Run one by hand with
    python tests/hardening_cases.py CASE BACKEND
"""
import copy
import sys

import torch
from torch import nn

from dps_fast import DPSAdamW, backends, param_groups, selection
from dps_fast.backends import reference
from training import assert_same_state, grid_grad


def expect_error(call, *words):
    """call() must raise ValueError whose message holds every one of `words`."""
    try:
        call()
    except ValueError as error:
        for word in words:
            assert word in str(error), f"{word!r} not in the message: {error}"
        return str(error)
    raise AssertionError(f"no ValueError (expected one naming {words})")


def seeded_grad(shape, seed, dtype=torch.float32):
    return grid_grad(shape, torch.Generator().manual_seed(seed), dtype)


def hand_steps(opt, params, steps, first_seed=0):
    for step in range(steps):
        for i, param in enumerate(params):
            param.grad = seeded_grad(param.shape, 1000 * (first_seed + step) + i, param.dtype)
        opt.step()


def snapshot(opt):
    """Every tensor and number of the optimizer's state and groups, copied."""
    return copy.deepcopy(opt.state_dict())


def assert_same(got, want, what, tol=1e-6):
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def assert_state_dicts_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert_same_state(a["state"], b["state"])


def run_pair(backend, build, steps, first_seed=10):
    """Build (backend) and build("torch") (each: a fresh (params, optimizer)), step both
    with the same gradients, and compare parameters and state after every step."""
    runs = [build(name) for name in (backend, "torch")]
    for step in range(steps):
        for params, opt in runs:
            hand_steps(opt, params, 1, first_seed + step)
        (params, opt), (ref_params, ref_opt) = runs
        tol = 1e-6 if params[0].dtype == torch.float32 else torch.finfo(params[0].dtype).eps
        for i, (p, q) in enumerate(zip(params, ref_params)):
            assert_same(p.detach(), q.detach(), f"step {step + 1}, param {i}", tol)
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor):
                    assert_same(value, ref_opt.state[q][key], f"step {step + 1}, param {i}, {key}")
    return runs


# ----- the cases ---------------------------------------------------------------------

def wrong_checkpoint(backend):
    """The optimizer state of a 4x4 layer loaded into a 64x64 layer: a clear error at load,
    nothing changed (before: heap corruption at the next step)."""
    torch.manual_seed(0)
    small, big = nn.Linear(4, 4, bias=False), nn.Linear(64, 64, bias=False)
    source = DPSAdamW(small.parameters(), stage_steps=2, backend=backend)
    hand_steps(source, [small.weight], 3)
    target = DPSAdamW(big.parameters(), stage_steps=2, backend=backend)
    hand_steps(target, [big.weight], 1)
    before = snapshot(target)
    expect_error(lambda: target.load_state_dict(source.state_dict()),
                 "param_groups[0]['params'][0]", "'exp_avg'", "(64, 64)")
    assert_state_dicts_equal(target.state_dict(), before)
    hand_steps(target, [big.weight], 3)


def reshaped_param(backend):
    """A parameter reshaped through .data after its state exists, or before its first
    step with its old gradient: a clear error at step, before anything changes (before:
    heap corruption; the second, once the state checks existed: an error from the
    kernel's check after the earlier group was updated)."""
    layer, other = nn.Linear(4, 4, bias=False), nn.Parameter(torch.randn(9))
    opt = DPSAdamW([{"params": [other], "dps": False}, {"params": [layer.weight]}], stage_steps=2, backend=backend)
    hand_steps(opt, [other, layer.weight], 2)
    layer.weight.data = torch.randn(64, 64)
    layer.weight.grad, other.grad = torch.randn(64, 64), torch.randn(9)
    before, kept = snapshot(opt), other.detach().clone()
    expect_error(opt.step, "param_groups[1]['params'][0]", "'exp_avg'", "(64, 64)")
    assert torch.equal(other.detach(), kept)
    assert_state_dicts_equal(opt.state_dict(), before)

    fresh = nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [fresh]})
    fresh.grad, other.grad = torch.randn(3), torch.randn(9)
    layer.weight.grad = None
    fresh.data = torch.randn(64)
    before = snapshot(opt)
    expect_error(opt.step, "param_groups[2]['params'][0]", "gradient", "(64,)")
    assert torch.equal(other.detach(), kept)
    assert_state_dicts_equal(opt.state_dict(), before)


def _adamw_trained(dtype):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 8)).to(dtype)
    adamw = torch.optim.AdamW(param_groups(model), lr=1e-2)
    params = [p for g in adamw.param_groups for p in g["params"]]
    hand_steps(adamw, params, 3)
    return model, adamw


def _migrated(model, state_dict, backend):
    clone = copy.deepcopy(model)
    opt = DPSAdamW(param_groups(clone), lr=1e-3, stage_steps=2, backend=backend)
    opt.load_state_dict(state_dict)
    return [p for g in opt.param_groups for p in g["params"]], opt


def adamw_bf16_migration(backend):
    """torch.optim.AdamW's state of a bf16 model (bf16 moments) loaded into DPSAdamW:
    moments become fp32, steps continue, the DPS schedule starts (before: libgomp
    deadlock or munmap_chunk(): invalid pointer)."""
    model, adamw = _adamw_trained(torch.bfloat16)
    state_dict = adamw.state_dict()
    assert state_dict["state"][0]["exp_avg"].dtype == torch.bfloat16
    (params, opt), _ = run_pair(backend, lambda name: _migrated(model, state_dict, name), steps=5)
    assert opt.param_groups[0]["dps_step"] == 5 and opt.param_groups[0]["lr"] == 1e-2  # AdamW's lr taken
    for param in params:
        assert opt.state[param]["exp_avg"].dtype == torch.float32 and opt.state[param]["step"] == 3 + 5
    assert opt.mask(params[0]) is not None  # steps 3-4 exploited


def adamw_state_dict(backend):
    """A full torch.optim.AdamW state dict (fp32) migrates (before: KeyError: 'dps' at step)."""
    model, adamw = _adamw_trained(torch.float32)
    state_dict = adamw.state_dict()
    (params, opt), _ = run_pair(backend, lambda name: _migrated(model, state_dict, name), steps=5)
    group = opt.param_groups[0]
    assert group["dps"] and group["stage_steps"] == 2 and group["dps_step"] == 5
    assert opt.state[params[0]]["step"] == 8


def low_precision_checkpoint(backend):
    """fp16 moments and score in a DPSAdamW checkpoint: loaded as fp32 (before: free():
    invalid next size)."""
    torch.manual_seed(2)
    params = [nn.Parameter(torch.randn(300, 7)), nn.Parameter(torch.randn(5000))]
    source = DPSAdamW(params, stage_steps=2, backend="torch")
    hand_steps(source, params, 3)
    state_dict = source.state_dict()
    for entry in state_dict["state"].values():
        for key in ("exp_avg", "exp_avg_sq", "score"):
            entry[key] = entry[key].half()

    def build(name):
        clones = [nn.Parameter(p.detach().clone()) for p in params]
        opt = DPSAdamW(clones, stage_steps=2, backend=name)
        opt.load_state_dict(state_dict)
        assert opt.state[clones[0]]["exp_avg"].dtype == torch.float32
        return clones, opt

    run_pair(backend, build, steps=4)


def bad_masks(backend):
    """A truncated packed mask is a clear error, at load and in a direct backend call
    (before: read past the buffer, a silently wrong subnetwork); a mask stored unpacked
    (bool) is packed on load."""
    torch.manual_seed(3)
    param = nn.Parameter(torch.randn(64, 64))
    source = DPSAdamW([param], stage_steps=2, backend="torch", masked="freeze")
    hand_steps(source, [param], 3)  # steps 1-2 explore, step 3 selects the mask of stage 3-4
    state_dict = source.state_dict()
    bits = state_dict["state"][0]["mask"]
    truncated = copy.deepcopy(state_dict)
    truncated["state"][0]["mask"] = bits[:8]
    target = DPSAdamW([nn.Parameter(param.detach().clone())], stage_steps=2, backend=backend)
    expect_error(lambda: target.load_state_dict(truncated), "'mask'", "(512,)", "packed mask bits")
    # another subnetwork than the scores would give, stored as bool: step 4 must apply it
    chosen = torch.rand(param.shape, generator=torch.Generator().manual_seed(6)) < 0.5
    unpacked = copy.deepcopy(state_dict)
    unpacked["state"][0]["mask"] = chosen

    def build(name):
        clone = nn.Parameter(param.detach().clone())
        opt = DPSAdamW([clone], stage_steps=2, backend=name, masked="freeze")
        opt.load_state_dict(unpacked)
        assert torch.equal(opt.state[clone]["mask"], selection.pack_mask(chosen))
        return [clone], opt

    (params, _), _ = run_pair(backend, build, steps=1, first_seed=3)  # step 4 exploits with the loaded mask
    moved = params[0].detach() != param.detach()
    assert torch.equal(moved, chosen), "step 4 did not update exactly the loaded subnetwork"
    module = backends.resolve(backend, "cpu")
    state = [torch.zeros(4096) for _ in range(3)]
    expect_error(lambda: module.update([torch.zeros(4096)], [torch.ones(4096)], [state[0]], [state[1]], [1],
                                       lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                       masks=[torch.zeros(8, dtype=torch.uint8)]), "params[0]", "'mask'")
    expect_error(lambda: module.update([torch.zeros(4096)], [torch.ones(4096)], [torch.zeros(4096).bfloat16()],
                                       [state[1]], [1], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                       weight_decay=0.0), "params[0]", "'exp_avg'", "torch.float32")
    expect_error(lambda: module.masked_norms([torch.ones(4096)], [torch.zeros(8, dtype=torch.uint8)]), "masks[0]")


def incomplete_checkpoint(backend):
    """A state entry that lacks a piece the step reads (a moment, the mask a tag names):
    a clear error at load, nothing changed (before: accepted, then KeyError mid-step
    after the earlier groups were updated)."""
    torch.manual_seed(7)
    params = [nn.Parameter(torch.randn(40, 3)), nn.Parameter(torch.randn(50))]
    opt = DPSAdamW([{"params": [params[0]]}, {"params": [params[1]]}], stage_steps=1, backend=backend)
    hand_steps(opt, params, 2)
    before = snapshot(opt)
    for key, words in (("exp_avg_sq", ("param_groups[1]['params'][0]", "'exp_avg_sq'")),
                       ("mask", ("param_groups[1]['params'][0]", "'mask_stage'", "'mask'"))):
        broken = copy.deepcopy(before)
        del broken["state"][1][key]
        expect_error(lambda: opt.load_state_dict(broken), *words)
        assert_state_dicts_equal(opt.state_dict(), before)
    hand_steps(opt, params, 2)


def mixed_devices(backend):
    """One backend call given tensors of two devices (a CPU tensor and a meta one): a
    clear error (before: the cpu kernels read the meta tensors' null addresses, SIGSEGV)."""
    module = backends.resolve(backend, "cpu")
    cpu_and_meta = [torch.zeros(1000), torch.zeros(1000, device="meta")]

    def like(tensors, **kwargs):
        return [torch.zeros_like(t, **kwargs) for t in tensors]

    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    expect_error(lambda: module.update(cpu_and_meta, like(cpu_and_meta), like(cpu_and_meta), like(cpu_and_meta),
                                       [1, 1], **hyper), "params[1]", "meta")
    expect_error(lambda: module.select_masks(cpu_and_meta, 0.3), "scores[1]", "meta")
    bits = [torch.zeros(125, dtype=torch.uint8, device=t.device) for t in cpu_and_meta]
    expect_error(lambda: module.masked_norms(cpu_and_meta, bits), "grads[1]", "meta")
    if backend == "cpu":  # its kernels run on the CPU whatever the tensors' device
        meta = cpu_and_meta[1:]
        expect_error(lambda: module.update(meta, like(meta), like(meta), like(meta), [1], **hyper), "params[0]", "meta")


def channels_last_moments(backend):
    """A Conv2d trained in channels_last, resumed with a contiguous model: the loaded
    moments take the parameter's layout (before: 5.7e-2 off the torch backend after 4 steps)."""
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    source = DPSAdamW(conv.parameters(), stage_steps=2, backend="torch")
    hand_steps(source, list(conv.parameters()), 3)
    state_dict = source.state_dict()
    assert not state_dict["state"][0]["exp_avg"].is_contiguous()

    def build(name):
        clone = nn.Conv2d(8, 16, 3)
        clone.load_state_dict(conv.state_dict())  # contiguous weights, the same values
        opt = DPSAdamW(clone.parameters(), stage_steps=2, backend=name)
        opt.load_state_dict(state_dict)
        assert opt.state[clone.weight]["exp_avg"].is_contiguous()
        return list(clone.parameters()), opt

    run_pair(backend, build, steps=4)


def stage_steps_change(backend):
    """A change of stage_steps mid-run starts a new schedule: the next exploitation stage
    selects from the scores of the new schedule's exploration stage only (before: the
    stale mask of the old schedule, scores added to the old ones)."""
    param = nn.Parameter(torch.randn(1000))
    opt = DPSAdamW([param], stage_steps=3, backend=backend)
    hand_steps(opt, [param], 5)  # 1-3 explore, 4-5 exploit
    old_mask = opt.mask(param).clone()
    opt.param_groups[0]["stage_steps"] = 2
    phases = []
    for step in range(6, 10):  # the new schedule: 6-7 explore, 8-9 exploit
        phases.append(opt.phase)
        hand_steps(opt, [param], 1, first_seed=step)
    assert phases == ["explore", "explore", "exploit", "exploit"], phases
    scores = sum(seeded_grad(param.shape, 1000 * step) ** 2 for step in (6, 7))
    want = selection.select_mask(scores, 0.3)
    assert torch.equal(opt.mask(param), want) and not torch.equal(want, old_mask)


def nan_scores(backend):
    """NaN scores rank as -inf: a mask keeps at least k entries (before: a NaN counted
    toward k but was not kept, 69 of k = 70 entries)."""
    module = backends.resolve(backend, "cpu")
    generator = torch.Generator().manual_seed(5)
    for nans in (1, 40, 100):
        score = torch.rand(100, generator=generator)
        score[torch.randperm(100, generator=generator)[:nans]] = float("nan")
        bits, = module.select_masks([score], 0.3)
        assert torch.equal(bits, reference.select_masks([score], 0.3)[0])
        mask = selection.unpack_mask(bits, score.shape)
        assert int(mask.sum()) >= 70, (nans, int(mask.sum()))
        if nans <= 30:  # enough numbers: no NaN is kept
            assert not mask[score.isnan()].any()
        else:  # the k-th largest is a NaN (-inf): every entry ties or ranks above it
            assert mask.all()


CASES = [wrong_checkpoint, reshaped_param, adamw_bf16_migration, adamw_state_dict, low_precision_checkpoint,
         bad_masks, incomplete_checkpoint, mixed_devices, channels_last_moments, stage_steps_change, nan_scores]

if __name__ == "__main__":
    case, backend = sys.argv[1:3]
    {c.__name__: c for c in CASES}[case](backend)
    print(f"ok: {case} on {backend}")
