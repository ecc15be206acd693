"""DPSAdamW's semantics beyond the parity tests: equality with AdamW where DPS does
nothing, masked updates, resume, clipping, bad input. (The torch.optim contract on
every backend: test_contract.py; schedule, amp, mix, groups: their own test files.)"""
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dps_fast import DPSAdamW, backends, param_groups
from training import batch, tiny_model, train_step


# ----- equal to AdamW where DPS does nothing --------------------------------------

@pytest.mark.parametrize("how", ["sparsity0", "plain-group"])
def test_torch_backend_equals_torch_adamw_to_the_bit(how):
    # Training a model amplifies 1-ulp differences past 1e-6 within steps, so
    # this holds for the reference backend, which repeats AdamW's ops exactly.
    model, reference = tiny_model(), tiny_model()
    hyper = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05)
    groups = [{"params": model.parameters(), "dps": how == "sparsity0"}]
    opt = DPSAdamW(groups, **hyper, sparsity=0.0, stage_steps=2, backend="torch")
    torch_opt = torch.optim.AdamW(reference.parameters(), **hyper)
    for step in range(1, 10):
        train_step(model, opt, step)
        train_step(reference, torch_opt, step)
        for mine, theirs in zip(model.parameters(), reference.parameters()):
            assert torch.equal(mine, theirs)


@pytest.mark.parametrize("backend", backends.available("cpu"))
@pytest.mark.parametrize("how", ["sparsity0", "plain-group"])
def test_every_backend_equals_torch_adamw(backend, how):
    # The same gradients for both (no model feedback): every step within 1e-6.
    generator = torch.Generator().manual_seed(0)
    shapes = [(0,), (1,), (7,), (33, 17), (4097,)]
    mine = [nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in mine]
    hyper = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05)
    opt = DPSAdamW([{"params": mine, "dps": how == "sparsity0"}], **hyper, sparsity=0.0, stage_steps=2,
                   backend=backend)
    torch_opt = torch.optim.AdamW(theirs, **hyper)
    for _ in range(9):
        for a, b in zip(mine, theirs):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        opt.step()
        torch_opt.step()
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----- masked semantics ----------------------------------------------------------

def _hand_step(opt, param, grad):
    param.grad = grad.clone()
    opt.step()


@pytest.mark.parametrize("masked", ["grad", "freeze"])
def test_masked_entries(masked):
    param = nn.Parameter(torch.ones(10))
    opt = DPSAdamW([param], lr=0.1, weight_decay=0.1, sparsity=0.3, stage_steps=1, masked=masked)
    _hand_step(opt, param, torch.arange(10.0))  # explore: entries 0-2 score lowest
    before = param.detach().clone()
    moments = opt.state[param]["exp_avg"].clone(), opt.state[param]["exp_avg_sq"].clone()
    _hand_step(opt, param, torch.ones(10))  # exploit
    frozen = ~opt.mask(param)
    assert frozen.tolist() == [True] * 3 + [False] * 7
    assert not torch.equal(param[~frozen], before[~frozen])
    if masked == "freeze":
        assert torch.equal(param[frozen], before[frozen])
        assert torch.equal(opt.state[param]["exp_avg"][frozen], moments[0][frozen])
        assert torch.equal(opt.state[param]["exp_avg_sq"][frozen], moments[1][frozen])
    else:  # zero gradient: momentum and weight decay go on
        assert not torch.equal(param[frozen], before[frozen])
        torch.testing.assert_close(opt.state[param]["exp_avg"][frozen], 0.9 * moments[0][frozen])
    assert opt.state[param]["step"] == 2


# ----- state_dict ----------------------------------------------------------------

def _train(model, opt, steps, start=1):
    for step in range(start, start + steps):
        train_step(model, opt, step, clip=1.0)


@pytest.mark.parametrize("variant", ["dense", "mix"])
@pytest.mark.parametrize("stop", [2, 3, 4, 5, 8])  # T = 3: boundary between 3 and 4, and 6 and 7
def test_resume_mid_stage_is_bit_for_bit(variant, stop):
    total = 11

    def fresh():
        model = tiny_model()
        opt = DPSAdamW(param_groups(model), lr=1e-2, stage_steps=3, variant=variant)
        if variant == "mix":
            opt.attach_mix(model)
        return model, opt

    torch.manual_seed(7)
    model, opt = fresh()
    _train(model, opt, total)
    expected = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(7)
    model, opt = fresh()
    _train(model, opt, stop)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    del model, opt

    model, opt = fresh()
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    torch.set_rng_state(checkpoint["rng"])
    _train(model, opt, total - stop, start=stop + 1)
    for got, want in zip(model.parameters(), expected):
        assert torch.equal(got, want)


def test_load_state_dict_keeps_fp32_state_of_bf16_params():
    param = nn.Parameter(torch.randn(64).bfloat16())
    opt = DPSAdamW([param], lr=1e-2, stage_steps=1)
    for _ in range(3):
        _hand_step(opt, param, torch.randn(64).bfloat16())
    state = opt.state_dict()
    other = DPSAdamW([nn.Parameter(param.detach().clone())], lr=1e-2, stage_steps=1)
    other.load_state_dict(state)
    loaded = other.state[other.param_groups[0]["params"][0]]
    assert loaded["exp_avg"].dtype == torch.float32 and loaded["score"].dtype == torch.float32
    assert torch.equal(loaded["exp_avg"], opt.state[param]["exp_avg"])
    assert loaded["mask"].dtype == torch.uint8


def test_low_precision_params_use_fp32_state():
    for dtype in (torch.bfloat16, torch.float16):
        param = nn.Parameter(torch.randn(32).to(dtype))
        opt = DPSAdamW([param], lr=1e-2, stage_steps=1)
        _hand_step(opt, param, torch.randn(32).to(dtype))
        assert param.dtype == dtype
        assert opt.state[param]["exp_avg"].dtype == torch.float32


# ----- the rest of the torch.optim contract ----------------------------------------

def test_lr_scheduler_drives_lr():
    param = nn.Parameter(torch.zeros(4))
    opt = DPSAdamW([param], lr=1.0, weight_decay=0.0, sparsity=0.0, stage_steps=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for lr in (1.0, 0.5, 0.25):
        assert opt.param_groups[0]["lr"] == lr
        before = param.detach().clone()
        _hand_step(opt, param, torch.ones(4))
        # Adam's first steps move by about lr with a constant gradient
        torch.testing.assert_close(before - param.detach(), torch.full((4,), lr), rtol=1e-4, atol=0)
        scheduler.step()


def test_add_param_group_joins_the_schedule():
    first = nn.Parameter(torch.randn(10))
    opt = DPSAdamW([first], lr=1e-2, stage_steps=2)
    for _ in range(3):
        _hand_step(opt, first, torch.randn(10))
    second = nn.Parameter(torch.randn(10))
    opt.add_param_group({"params": [second], "lr": 0.5})
    assert opt.param_groups[1]["dps_step"] == 3 and opt.param_groups[1]["stage_steps"] == 2
    first.grad, second.grad = torch.randn(10), torch.randn(10)
    opt.step()  # step 4: exploitation; `second` has no score yet and is updated densely
    assert opt.mask(first) is not None and opt.mask(second) is None
    with pytest.raises(ValueError, match="sparsity"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "sparsity": 1.0})
    assert len(opt.param_groups) == 2


def test_closure_is_called_and_its_loss_returned():
    model = tiny_model()
    opt = DPSAdamW(model.parameters(), stage_steps=2)
    tokens, labels = batch(0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(tokens), labels)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert opt.param_groups[0]["dps_step"] == 1


def test_zero_grad():
    param = nn.Parameter(torch.randn(5))
    opt = DPSAdamW([param], stage_steps=2)
    param.grad = torch.ones(5)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(param.grad, torch.zeros(5))
    opt.zero_grad()
    assert param.grad is None


# ----- clipping ------------------------------------------------------------------

def test_clip_grad_norm_clips_the_masked_gradient_and_scores_the_raw_one():
    param = nn.Parameter(torch.zeros(10))
    opt = DPSAdamW([param], lr=0.1, weight_decay=0.0, sparsity=0.5, stage_steps=1, masked="grad")
    raw = torch.arange(10.0)
    param.grad = raw.clone()
    norm = opt.clip_grad_norm_(1.0)
    assert norm.item() == pytest.approx(raw.norm().item())
    opt.step()
    assert torch.equal(opt.state[param]["score"], raw * raw)  # unclipped
    torch.testing.assert_close(opt.state[param]["exp_avg"], 0.1 * raw / (raw.norm() + 1e-6))
    param.grad = torch.ones(10) * 3
    norm = opt.clip_grad_norm_(1.0)  # exploitation: only the 5 kept entries count
    assert norm.item() == pytest.approx(math.sqrt(5 * 9))


@pytest.mark.parametrize("backend", backends.available("cpu"))
def test_clip_with_a_0_dim_param_beside_a_float64_one(backend):
    """The clip factor is float64 when any gradient is: it must not promote a 0-dim fp32
    gradient (a logit_scale). torch.optim.AdamW with torch.nn.utils.clip_grad_norm_ takes it."""
    torch.manual_seed(0)
    scale = nn.Parameter(torch.tensor(1.0))
    weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    other_scale, other_weight = nn.Parameter(scale.detach().clone()), nn.Parameter(weight.detach().clone())
    opt = DPSAdamW([scale, weight], lr=1e-2, sparsity=0.0, stage_steps=2, backend=backend)  # AdamW's steps
    adamw = torch.optim.AdamW([other_scale, other_weight], lr=1e-2)
    for step in range(4):  # explore 1-2, exploit 3-4 (masks keep everything: masked norms, AdamW's values)
        for params, clip, optimizer in (((scale, weight), opt.clip_grad_norm_, opt),
                                        ((other_scale, other_weight), lambda n: torch.nn.utils.clip_grad_norm_(
                                            [other_scale, other_weight], n), adamw)):
            optimizer.zero_grad()
            torch.manual_seed(step)
            (params[0] * 3 + (params[1] * torch.randn(3, 4, dtype=torch.float64)).sum()).backward()
            clip(0.5)
            optimizer.step()
    assert scale.dtype == torch.float32 and opt.state[scale]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(scale, other_scale, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weight, other_weight, rtol=1e-12, atol=1e-12)


def test_clip_is_dropped_when_gradients_change_after_it():
    param = nn.Parameter(torch.zeros(4))
    opt = DPSAdamW([param], lr=0.1, weight_decay=0.0, stage_steps=5)
    param.grad = torch.ones(4) * 10
    opt.clip_grad_norm_(1.0)
    param.grad.mul_(2)
    with pytest.warns(UserWarning, match="clip"):
        opt.step()
    torch.testing.assert_close(opt.state[param]["exp_avg"], torch.full((4,), 2.0))


# ----- bad input ---------------------------------------------------------------------

def _param():
    return nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(sparsity=1.0), ValueError, "sparsity must be a number in \\[0, 1\\)"),
    (dict(sparsity=-0.1), ValueError, "sparsity"),
    (dict(stage_steps=0), ValueError, "stage_steps must be an integer >= 1"),
    (dict(stage_steps=2.5), ValueError, "stage_steps"),
    (dict(stage_steps=None), ValueError, "stage_steps .* or total_steps"),
    (dict(stage_steps=None, total_steps=10, stage_ratio=0.05), ValueError, "int\\(total_steps \\* stage_ratio\\)"),
    (dict(stage_steps=None, total_steps=0), ValueError, "total_steps must be"),
    (dict(stage_steps=None, total_steps=100, stage_ratio=0.0), ValueError, "stage_ratio"),
    (dict(total_steps=100), ValueError, "not both"),
    (dict(variant="sparse"), ValueError, "variant must be one of \\('dense', 'mix'\\)"),
    (dict(masked="zero"), ValueError, "masked must be one of \\('grad', 'freeze'\\)"),
    (dict(backend="gpu"), ValueError, "backend must be one of 'auto', "),
    (dict(lr=-1.0), ValueError, "lr must be"),
    (dict(eps=-1e-8), ValueError, "eps must be"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be"),
    (dict(betas=(0.9, 1.0)), ValueError, "betas must be a pair of numbers in \\[0, 1\\)"),
    (dict(betas=(-0.1, 0.9)), ValueError, "betas"),
    (dict(betas=(0.9,)), ValueError, "betas"),
    (dict(betas=(torch.tensor(0.9), 1.0)), ValueError, "betas"),
    (dict(lr=torch.tensor([1e-3, 2e-3])), ValueError, "Tensor lr must be 1-element"),
    (dict(lr=torch.tensor(-1.0)), ValueError, "lr must be a real number >= 0"),
    (dict(amsgrad=True), ValueError, "amsgrad=True is not supported by DPSAdamW: .*torch.optim.AdamW"),
    (dict(capturable=True), ValueError, "capturable=True is not supported by DPSAdamW: .*CUDA graph"),
    (dict(differentiable=True), ValueError, "differentiable=True is not supported by DPSAdamW"),
    (dict(maximize="yes"), TypeError, "maximize must be True or False"),
    (dict(fused="yes"), TypeError, "fused must be None, True or False"),
    (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together"),
    (dict(fused=True, backend="torch"), ValueError, "fused=True / foreach=True .* backend='torch'"),
    (dict(foreach=False, backend="cpu"), ValueError, "fused=False / foreach=False .* not backend='cpu'"),
])
def test_bad_arguments(kwargs, error, words):
    kwargs = {"stage_steps": 5, **kwargs}
    with pytest.raises(error, match=words):
        DPSAdamW([_param()], **kwargs)


def test_bad_params():
    with pytest.raises(TypeError, match="real floating-point"):
        DPSAdamW([nn.Parameter(torch.zeros(3, dtype=torch.complex64))], stage_steps=5)
    with pytest.raises(TypeError, match="floating-point"):
        DPSAdamW([torch.zeros(3, dtype=torch.int64)], stage_steps=5)
    with pytest.raises(ValueError, match="variant"):
        DPSAdamW([{"params": [_param()], "variant": "other"}], stage_steps=5)
    with pytest.raises(TypeError, match="dps must be True or False"):
        DPSAdamW([{"params": [_param()], "dps": "yes"}], stage_steps=5)


def test_unavailable_backend_is_a_clear_error():
    from dps_fast import backends
    missing = [name for name in backends.BACKEND_NAMES if name not in backends.available("cpu")]
    if not missing:
        pytest.skip("every backend runs on this machine")
    with pytest.raises(RuntimeError, match=f"backend='{missing[0]}' cannot run on cpu here: .+Available: "):
        DPSAdamW([_param()], stage_steps=5, backend=missing[0])


def test_sparse_gradient_is_refused_before_anything_changes():
    dense, sparse = _param(), _param()
    opt = DPSAdamW([dense, sparse], stage_steps=5)
    dense.grad = torch.ones(3)
    sparse.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(dense, torch.zeros(3)) and not opt.state and opt.param_groups[0]["dps_step"] == 0


def test_a_backend_that_cannot_run_a_later_group_is_refused_before_anything_changes():
    first, later = _param(), nn.Parameter(torch.zeros(3, device="meta"))
    opt = DPSAdamW([{"params": [first]}, {"params": [later], "dps": False}], stage_steps=5)
    opt.param_groups[1]["fused"] = True  # no multi-tensor kernel runs on meta tensors
    first.grad, later.grad = torch.ones(3), torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="fused=True / foreach=True: no multi-tensor kernel can run on meta"):
        opt.step()
    assert torch.equal(first, torch.zeros(3)) and not opt.state
    assert [g["dps_step"] for g in opt.param_groups] == [0, 0]


def test_a_torch_adamw_migration_keeps_the_implementation_flags_of_the_groups():
    # in torch.optim.AdamW foreach/fused choose its loop; in DPSAdamW they choose the backend
    for adamw_flags, backend in ((dict(fused=True), "torch"), (dict(foreach=False), "auto"),
                                 (dict(foreach=True), "torch")):
        param = _param()
        adamw = torch.optim.AdamW([param], **adamw_flags)
        param.grad = torch.ones(3)
        adamw.step()
        opt = DPSAdamW([param], stage_steps=2, backend=backend)
        opt.load_state_dict(adamw.state_dict())
        assert (opt.param_groups[0]["foreach"], opt.param_groups[0]["fused"]) == (None, None), adamw_flags
        opt.step()
        assert opt.state[param]["step"] == 2


# ----- torch.optim.AdamW's ways of passing parameters and options ----------------------

def test_named_parameters_are_accepted_and_saved():
    model = nn.Linear(4, 3)
    opt = DPSAdamW(model.named_parameters(), stage_steps=2)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    with pytest.raises(ValueError, match="all tensors or all \\(name, tensor\\) pairs"):
        DPSAdamW([("weight", model.weight), model.bias], stage_steps=2)


@pytest.mark.parametrize("make", [
    lambda optimizer, a, b: optimizer([a], lr=torch.tensor([1e-3, 2e-3])),
    lambda optimizer, a, b: optimizer([("a", a), b]),
    lambda optimizer, a, b: optimizer([{"params": [("a", a)]}, {"params": [b]}]),
    lambda optimizer, a, b: optimizer([a], lr=-1.0),
    lambda optimizer, a, b: optimizer([a], eps=-1e-8),
    lambda optimizer, a, b: optimizer([a], weight_decay=-0.1),
    lambda optimizer, a, b: optimizer([a], betas=(0.9, 1.0)),
    lambda optimizer, a, b: optimizer([a], betas=(-0.1, 0.9)),
    lambda optimizer, a, b: optimizer([a], fused=True, foreach=True),
], ids=["tensor-lr", "named-and-unnamed", "named-and-unnamed-groups", "lr", "eps", "weight-decay", "beta1",
        "beta0", "fused-and-foreach"])
def test_torch_words_for_the_same_mistakes(make):
    """Code and tests written for torch.optim match its messages and exception types:
    ours start with its words (our explanation follows)."""
    a, b = _param(), _param()
    with pytest.raises(Exception) as theirs:
        make(torch.optim.AdamW, a, b)
    with pytest.raises(theirs.type) as ours:
        make(lambda *args, **kwargs: DPSAdamW(*args, stage_steps=2, **kwargs), a, b)
    assert str(ours.value).startswith(str(theirs.value)), (str(ours.value), str(theirs.value))


def test_state_entries_that_are_not_parameters_are_kept():
    """opt.state["extra"] = 1, as torch.optim.AdamW steps and saves it."""
    model = tiny_model()
    for variant in ("dense", "mix"):
        opt = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2, variant=variant)
        handle = opt.attach_mix(model) if variant == "mix" else None
        opt.state["extra"] = 1
        for step in range(3):
            train_step(model, opt, step)
        saved = opt.state_dict()
        assert saved["state"]["extra"] == 1
        again = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2, variant=variant)
        again.load_state_dict(saved)
        assert again.state["extra"] == 1
        if handle is not None:
            handle.remove()


def test_fused_and_foreach_choose_between_kernel_and_loop():
    param = _param()
    assert DPSAdamW([param], stage_steps=2, fused=False)._backend_for(
        "cpu", {"fused": False, "foreach": None, "state_dtype": "fp32"}).NAME == "torch"
    looped = DPSAdamW([param], stage_steps=2, foreach=False)
    assert looped._backend_for("cpu", looped.param_groups[0]).NAME == "torch"
    if "cpu" in backends.available("cpu"):
        fused = DPSAdamW([param], stage_steps=2, fused=True)
        assert fused._backend_for("cpu", fused.param_groups[0]).NAME == "cpu"


def test_stage_length_given_in_a_group_only():
    managed, plain = _param(), _param()
    opt = DPSAdamW([{"params": [managed], "stage_steps": 3}, {"params": [plain], "dps": False}])
    assert opt.param_groups[0]["stage_steps"] == 3 and opt.param_groups[1]["stage_steps"] is None
    for param in (managed, plain):
        param.grad = torch.ones(3)
    opt.clip_grad_norm_(1.0)
    opt.step()  # the plain group, which has no stage length, steps as AdamW
    assert opt.state[plain]["step"] == 1 and "score" not in opt.state[plain]
    assert DPSAdamW([{"params": [managed], "total_steps": 100}]).param_groups[0]["stage_steps"] == 5
    with pytest.raises(ValueError, match="param group 1: stage length missing"):
        DPSAdamW([{"params": [plain], "dps": False}, {"params": [managed]}])


def test_an_optimizer_of_plain_groups_needs_no_stage_length():
    param, other = _param(), _param()
    opt = DPSAdamW([{"params": [param], "dps": False}], lr=1e-2, backend="torch")
    adamw = torch.optim.AdamW([other], lr=1e-2)
    for step in range(3):
        param.grad, other.grad = torch.full((3,), step + 1.0), torch.full((3,), step + 1.0)
        opt.step()
        adamw.step()
    assert opt.param_groups[0]["dps_step"] == 3 and torch.equal(param, other)


def test_a_group_stage_ratio_applies_to_the_optimizers_total_steps():
    managed, other = _param(), _param()
    opt = DPSAdamW([{"params": [managed]}, {"params": [other], "stage_ratio": 0.2}], total_steps=100)
    assert [g["stage_steps"] for g in opt.param_groups] == [5, 20]
    opt = pickle.loads(pickle.dumps(opt))
    opt.add_param_group({"params": [_param()], "stage_ratio": 0.1})
    assert opt.param_groups[2]["stage_steps"] == 10
    with pytest.raises(ValueError, match="param group 0: stage_ratio=0.2 sets T .* no total_steps was given"):
        DPSAdamW([{"params": [managed], "stage_ratio": 0.2}], stage_steps=3)
    with pytest.raises(ValueError, match="param group 0: stage_ratio must be a number in \\(0, 1\\]; got 2"):
        DPSAdamW([{"params": [managed], "stage_ratio": 2}], total_steps=100)
    plain = DPSAdamW([{"params": [other], "dps": False, "stage_ratio": 0.001}, {"params": [managed]}], stage_steps=5)
    assert [g["stage_steps"] for g in plain.param_groups] == [5, 5]  # a plain group needs no stage length


def _mix_state_after(steps):
    """A DPS-Mix optimizer after `steps` steps of T = 1, and its state dict."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))
    opt = DPSAdamW(param_groups(model), stage_steps=1, variant="mix")
    opt.attach_mix(model)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 0, 1])).backward()
        opt.step()
    return opt, opt.state_dict()


@pytest.mark.parametrize("key, words", [  # the key deleted, the message's words (a regex)
    ("step", "has \\['exp_avg', 'exp_avg_sq'\\] but not \\['step'\\]"),
    ("exp_avg", "has \\['step', 'exp_avg_sq'\\] but not \\['exp_avg'\\]"),
    ("score", "has 'score_stage' but not 'score'"),
    ("mix_count", "has 'score_stage' but not 'mix_count'"),
    ("mask", "has 'mask_stage' but not 'mask'"),
    ("mix_snapshot", "has 'snapshot_stage' but not 'mix_snapshot'"),
])
def test_an_incomplete_state_entry_is_refused_at_load(key, words):
    opt, state_dict = _mix_state_after(3)  # steps 1 and 3 explore, step 2 exploits: every key exists
    before = opt.state_dict()
    del state_dict["state"][0][key]
    with pytest.raises(ValueError, match=f"param_groups\\[0\\]\\['params'\\]\\[0\\]: state {words}"):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][0][k], v) for k, v in before["state"][0].items()
               if isinstance(v, torch.Tensor))


def test_a_parameter_replaced_in_place_is_found():
    old, new = _param(), _param()
    opt = DPSAdamW([old], stage_steps=1, backend="torch")
    old.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["params"][0] = new
    assert opt.mask(new) is None
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.mask(old)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_exploitation_clip_norms_take_torchs_dtypes(dtype):
    """In exploitation the total norm is torch.nn.utils.get_total_norm of the masked
    gradients and the other ones: each masked norm in its gradient's dtype, promoted
    beside the others as torch promotes them (no overflow of a vector of fp16 norms)."""
    torch.manual_seed(0)
    managed = [nn.Parameter(torch.randn(s).to(dtype)) for s in [(64, 32), (32, 32), (16, 16)]]
    plain, wide = nn.Parameter(torch.randn(50).to(dtype)), nn.Parameter(torch.randn(10))
    opt = DPSAdamW([{"params": managed}, {"params": [plain, wide], "dps": False}], lr=1e-3, stage_steps=1,
                   backend="torch")
    for step in range(2):  # explore, exploit
        scale = 1000.0 if dtype == torch.float16 else 1.0  # fp16: masked norms near 65504 each
        for p in managed + [plain, wide]:
            p.grad = (torch.randn(p.shape) * scale).to(p.dtype)
        norm = opt.clip_grad_norm_(1.0)
        applied = [p.grad * opt.mask(p) if step else p.grad for p in managed] + [plain.grad, wide.grad]
        assert torch.isfinite(norm) and torch.equal(norm, torch.nn.utils.get_total_norm(applied))
        opt.step()
