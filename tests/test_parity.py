"""DPSAdamW against an independent port of the published mechanism
(dps_fast.published.PublishedDPS), plus direct checks of two rules of the
spec that parity alone could miss: ties at the threshold are kept, and
scores restart at every exploration stage.

The model-based comparison goes one step at a time from identical state:
before each step, DPSAdamW's parameters and state are copied into the
port, so a 1-ulp difference between the two (torch's kernels round
differently on AVX-512, AVX2 and baseline CPUs) cannot grow into a flipped
near-tied selection; masks are compared exactly, as they are selected from
identical scores. An end-to-end run is kept where it is stable by
construction: gradients on a 1/16 grid make every score exact.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dps_fast import DPSAdamW, backends, param_groups
from dps_fast.tiny import TinyEncoder, synthetic_task
from dps_fast.published import PublishedDPS
from training import grid_grad

STAGE_STEPS = 3
STEPS = 14  # stages 1-5: explore, exploit, explore, exploit, explore (2 steps)
HYPER = dict(lr=1e-2, weight_decay=0.05, sparsity=0.3, stage_steps=STAGE_STEPS)


def _train_step(model, opt, tokens, labels, seed, clip):
    """One step; returns the gradient norm before clipping (None without clipping)."""
    opt.zero_grad()
    torch.manual_seed(seed)  # same mixout draws for both models
    F.cross_entropy(model(tokens), labels).backward()
    norm = None if clip is None else opt.clip_grad_norm_(clip)
    opt.step()
    return norm


def _copy_state(ours, published, pairs):
    """Give the port DPSAdamW's parameters and state (moments, scores, masks, DPS-Mix
    counts and snapshots), so that the next step starts from identical state."""
    with torch.no_grad():
        for a, b in pairs:
            b.copy_(a)
            state, adam = ours.state.get(a, {}), published.optimizer.state.get(b, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    adam[key].copy_(state[key])
            if b not in published.state:
                continue
            mine = published.state[b]
            for key, theirs in (("score", "score"), ("mix_count", "count"), ("mix_snapshot", "snapshot")):
                if key in state and theirs in mine:
                    mine[theirs] = state[key].clone()
            if "mask" in mine:
                mine["mask"] = ours.mask(a).clone()


@pytest.mark.parametrize("clip", [None, 0.05], ids=["noclip", "clip"])
@pytest.mark.parametrize("masked", ["grad", "freeze"])
@pytest.mark.parametrize("variant", ["dense", "mix"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])  # the spec, and the compiled kernels
def test_dpsadamw_matches_published(backend, variant, masked, clip):
    if backends.unavailable_reason(backend, "cpu"):  # tests/test_build.py says whether it should run
        pytest.skip(backends.unavailable_reason(backend, "cpu"))
    torch.manual_seed(0)
    ours_model = TinyEncoder(vocab=16, dim=16, layers=2, heads=2, length=8)
    for block in ours_model.blocks:
        # Softmax ignores a shift shared by all keys: the key bias gradient is
        # rounding noise (~1e-10), which Adam would turn into lr-sized steps.
        block.key.bias.requires_grad_(False)
    published_model = copy.deepcopy(ours_model)
    tokens, labels = synthetic_task(STEPS * 8, vocab=16, length=8, seed=1)

    ours = DPSAdamW(param_groups(ours_model), variant=variant, masked=masked, backend=backend, **HYPER)
    if variant == "mix":
        ours.attach_mix(ours_model)
    published = PublishedDPS(published_model, param_groups(published_model), variant=variant, masked=masked,
                             **HYPER)
    pairs = list(zip(ours_model.parameters(), published_model.parameters()))
    managed = [(a, b) for (name, a), b in zip(ours_model.named_parameters(), published_model.parameters())
               if name.endswith("weight") and a.dim() == 2 and "embed" not in name]
    assert len(managed) == 2 * 6 + 2

    phases, mask_sizes = [], []
    for step in range(STEPS):
        assert ours.phase == published.phase
        phases.append(ours.phase)
        _copy_state(ours, published, pairs)
        batch = slice(8 * step, 8 * step + 8)
        norms = [_train_step(model, opt, tokens[batch], labels[batch], seed=100 + step, clip=clip)
                 for model, opt in ((ours_model, ours), (published_model, published))]
        if clip is not None:
            torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0)
            assert norms[0] > clip  # the clip is active
        for a, b in managed:
            mask_a, mask_b = ours.mask(a), published.mask(b)
            assert (mask_a is None) == (mask_b is None), f"step {step + 1}"
            if mask_a is not None:
                assert torch.equal(mask_a, mask_b), f"masks differ after step {step + 1}"
                mask_sizes.append(mask_a.sum().item())
            if "score" in ours.state[a]:
                torch.testing.assert_close(ours.state[a]["score"], published.state[b]["score"], rtol=1e-5,
                                           atol=0, msg=lambda m: f"score, step {step + 1}: {m}")
            if "mix_count" in ours.state[a]:  # keep counts: whole numbers, counted on each side this step
                assert torch.equal(ours.state[a]["mix_count"], published.state[b]["count"]), f"step {step + 1}"
        for (name, a), b in zip(ours_model.named_parameters(), published_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}, step {step + 1}: {m}")
    assert phases == (["explore"] * 3 + ["exploit"] * 3) * 2 + ["explore"] * 2
    assert mask_sizes and all(0 < n for n in mask_sizes)
    published.remove()
    if variant == "mix":  # the forwards are restored: evaluation uses W on both sides
        ours_model.eval(), published_model.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours_model(tokens[:8]), published_model(tokens[:8]), rtol=1e-5, atol=1e-6)


class _Weights(nn.Module):
    def __init__(self, shapes, generator):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(s, generator=generator)) for s in shapes)


@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("masked", ["grad", "freeze"])
def test_end_to_end_with_exact_scores(masked, clip):
    """Five stages without any copying: gradients on a 1/16 grid (set through autograd
    for the port's hooks) give exact scores, so both select the same masks on any CPU,
    and both run the same torch AdamW operations: parameters agree to the bit."""
    generator = torch.Generator().manual_seed(7)
    shapes = [(33, 17), (64,), (7, 9)]
    ours_model = _Weights(shapes, generator)
    published_model = copy.deepcopy(ours_model)
    ours = DPSAdamW(ours_model.parameters(), masked=masked, backend="torch", **HYPER)
    published = PublishedDPS(published_model, [{"params": list(published_model.parameters())}], masked=masked,
                             **HYPER)
    for step in range(STEPS):
        grads = [grid_grad(s, generator) for s in shapes]
        ours.zero_grad(), published.zero_grad()
        for param, grad in zip(ours_model.parameters(), grads):
            param.grad = grad.clone()
        sum((p * g).sum() for p, g in zip(published_model.parameters(), grads)).backward()
        if clip is not None:
            ours.clip_grad_norm_(clip), published.clip_grad_norm_(clip)
        ours.step(), published.step()
        for a, b in zip(ours_model.parameters(), published_model.parameters()):
            assert torch.equal(a, b), f"step {step + 1}"
            mask = ours.mask(a)
            assert (mask is None) == (published.mask(b) is None)
            assert mask is None or torch.equal(mask, published.mask(b)), f"step {step + 1}"
    assert ours.mask(ours_model.weights[0]) is not None


# ----- direct checks through DPSAdamW (and PublishedDPS) with hand-set gradients ------


class _Holder(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(values, dtype=torch.float32).clone())


def _make(kind, values, **kwargs):
    model = _Holder(values)
    groups = [{"params": [model.weight]}]
    if kind == "dpsadamw":
        return model.weight, DPSAdamW(groups, backend="torch", **kwargs)
    return model.weight, PublishedDPS(model, groups, **kwargs)


def _step_with_grad(param, opt, grad):
    """One optimizer step with gradient `grad` (set by hand, or through a
    backward pass for PublishedDPS, whose hooks see only autograd)."""
    opt.zero_grad()
    grad = torch.as_tensor(grad, dtype=torch.float32)
    if isinstance(opt, DPSAdamW):
        param.grad = grad.clone()
    else:
        (param * grad).sum().backward()
    opt.step()


@pytest.mark.parametrize("kind", ["dpsadamw", "published"])
def test_ties_at_the_threshold_are_kept(kind):
    # 10 entries, sparsity 0.3: k = 7. Scores (g^2) 25 16 9 4 1 1 1 1 .25 .01:
    # the 7th largest is 1, shared by four entries, so 8 entries are kept.
    grad = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, -1.0, 1.0, -1.0, 0.5, 0.1])
    param, opt = _make(kind, torch.zeros(10), lr=0.1, sparsity=0.3, stage_steps=1, masked="freeze")
    _step_with_grad(param, opt, grad)  # step 1 explores
    assert opt.mask(param) is None and opt.phase == "exploit"
    before = param.detach().clone()
    _step_with_grad(param, opt, torch.ones(10))  # step 2 exploits
    expected = torch.tensor([True] * 8 + [False] * 2)
    assert torch.equal(opt.mask(param), expected)
    assert torch.equal(param[~expected], before[~expected])  # frozen entries stay
    assert (param[expected] != before[expected]).all()  # tied entries move


@pytest.mark.parametrize("kind", ["dpsadamw", "published"])
def test_scores_restart_at_each_exploration_stage(kind):
    a, b = [1.0] * 5 + [0.0] * 5, [0.0] * 5 + [1.0] * 5  # entries 0-4 (A), 5-9 (B)
    scaled = lambda x, s: [v * s for v in x]  # noqa: E731
    param, opt = _make(kind, torch.zeros(10), lr=0.01, sparsity=0.5, stage_steps=2)
    _step_with_grad(param, opt, scaled(a, 10))  # stage 1 explores: A scores 100 each
    _step_with_grad(param, opt, scaled(a, 10))
    _step_with_grad(param, opt, scaled(a, 10))  # stage 2 exploits: gradients here are not scored
    assert torch.equal(opt.mask(param), torch.tensor(a, dtype=torch.bool))
    _step_with_grad(param, opt, scaled(a, 10))
    # Stage 3 explores: B scores 1, A 0.81, so B wins unless stage 1 (or 2)
    # still counts, or only the last step of the stage does.
    _step_with_grad(param, opt, b)
    _step_with_grad(param, opt, scaled(a, 0.9))
    assert opt.phase == "exploit"
    _step_with_grad(param, opt, torch.ones(10))  # stage 4 selects at its first step
    assert torch.equal(opt.mask(param), torch.tensor(b, dtype=torch.bool))
