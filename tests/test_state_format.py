"""Compact state and stochastic rounding (dps_fast.state_format, dps_fast.rounding):
the random bits, the stores, what a bf16 state costs and keeps, checkpoints across
formats, and a resume that repeats the random bits. (Every backend against the
reference with these storages: backend_checks.STORAGES and backend_parity's cases.)"""
import io

import pytest
import torch
from torch import nn

from dps_fast import DPSAdamW, param_groups, rounding, state_format
from dps_fast.backends import contract
from training import assert_same_state, tiny_model, train_step

LOW = [torch.bfloat16, torch.float16]


def _mix32_by_the_book(x):
    """lowbias32 with plain Python integers, reduced mod 2^32 after each product."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_is_lowbias32_on_ints_and_int64_tensors():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 0xDEADBEEF]
    assert [rounding.mix32(v) for v in values] == [_mix32_by_the_book(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.int64)
    assert rounding.mix32(tensor).tolist() == [_mix32_by_the_book(v) for v in values]
    assert rounding.mix32(1) != rounding.mix32(2) and rounding.mix32(0) == 0


def test_entry_words_are_a_function_of_the_global_index():
    """A shard's words, from its offset, are the whole tensor's; indices past 2^32 too."""
    key = rounding.stream_keys(1234, 7)[0]
    whole = rounding.entry_words(key, torch.arange(1000, dtype=torch.int64) + (1 << 32) - 500)
    first = rounding.entry_words(key, torch.arange(600, dtype=torch.int64) + (1 << 32) - 500)
    second = rounding.entry_words(key, torch.arange(400, dtype=torch.int64) + (1 << 32) + 100)
    assert torch.equal(whole, torch.cat([first, second]))
    assert rounding.stream_keys(1234, 7) != rounding.stream_keys(1234, 8) != rounding.stream_keys(1235, 7)
    low = (whole & 0xFFFF).double() / 0xFFFF
    assert abs(low.mean().item() - 0.5) < 0.05  # spread over [0, 1)


def _specials(dtype):
    big = torch.finfo(dtype).max
    return torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), big, -big, big * 1.001, 65520.0, 3.4e38,
                         1e-30, -1e-30, 3e-6, 1e-8, 1.0, -1.0])


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_store_rounds_between_the_neighbours_and_keeps_specials(dtype):
    torch.manual_seed(0)
    x = torch.cat([torch.randn(2000) * scale for scale in (1e-6, 1e-3, 1.0, 100.0)] + [_specials(dtype)])
    never = rounding.stochastic(x, dtype, torch.zeros_like(x, dtype=torch.int64))  # no dropped bit carries
    always = rounding.stochastic(x, dtype, torch.full_like(x, 0xFFFF, dtype=torch.int64))
    nearest = x.to(dtype)
    finite = x.abs() <= torch.finfo(dtype).max
    # toward zero with no random bits; the nearest value between the two choices
    assert (never.float().abs() <= x.abs())[finite].all()
    assert (((nearest.float() - never.float()) * (nearest.float() - always.float())) <= 0)[finite].all()
    # NaN stays NaN, inf stays inf, a finite value below the overflow threshold never becomes inf
    assert never[x.isnan()].isnan().all() and always[x.isnan()].isnan().all()
    assert torch.equal(always[x.isinf()].float(), x[x.isinf()]) and torch.equal(never[x.isinf()].float(),
                                                                                x[x.isinf()])
    kept_finite = nearest.isfinite()
    assert always[kept_finite].isfinite().all()
    overflows = ~nearest.isfinite() & x.isfinite()  # values past the dtype's largest, which nearest makes inf
    assert overflows.any()
    if dtype == torch.float16:  # from 65520 up, as nearest
        assert always[overflows].isinf().all() and never[overflows].isinf().all()
    else:  # bf16: rounded toward zero, to the largest bf16, rather than up to inf
        assert torch.equal(always[overflows].float().abs(), torch.full((int(overflows.sum()),), torch.finfo(dtype).max))


@pytest.mark.parametrize("value", [1.0 + 1 / 3, 0.013, -7.77e-3, 3e-6, 2e-7], ids=str)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_store_is_unbiased(dtype, value):
    """E[round(x)] = x: over all 2^16 random values exactly for bf16 and fp16 normals, within
    2^-16 of the kept unit below fp16's normal range."""
    x = torch.full((1 << 16,), value)
    r16 = torch.arange(1 << 16, dtype=torch.int64)
    mean = rounding.stochastic(x, dtype, r16).double().mean().item()
    unit = abs(x[0].to(dtype).double().item() - torch.nextafter(x[0].to(dtype), torch.tensor(0.0,
                                                                                             dtype=dtype)).double().item())
    assert abs(mean - x[0].double().item()) <= unit * 2 ** -15


def test_the_formats_and_the_kernel_codes():
    assert state_format.NAMES == ("fp32", "bf16", "8bit")
    assert {f.name: f.code for f in state_format.FORMATS.values()} == {
        "fp32": contract.StateFormat.FP32, "bf16": contract.StateFormat.BF16, "8bit": contract.StateFormat.EIGHT_BIT}
    bf16 = state_format.of("bf16")
    assert bf16.bytes_per_entry(managed=True) == 6.125 and bf16.bytes_per_entry(managed=False) == 4
    assert state_format.of("fp32").bytes_per_entry(managed=True) == 12.125
    assert bf16.dtype_for(torch.zeros(1, dtype=torch.float64)) == torch.float64


def _state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bf16_state_is_stored_in_bf16_and_costs_its_bytes(param_dtype):
    """Managed tensors: 2 + 2 + 2 bytes and a mask bit per entry (fp32 state: 12.125)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(64, 32).to(param_dtype)) for _ in range(3)]
    opt = DPSAdamW(params, lr=1e-3, stage_steps=2, state_dtype="bf16", rounding="stochastic")
    for _ in range(3):  # explore, explore, exploit (masks made)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    state = opt.state[params[0]]
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "score")} == {torch.bfloat16}
    assert _state_bytes(opt) / sum(p.numel() for p in params) == 6.125
    assert isinstance(state["round_seed"], int)


def test_fp32_state_and_nearest_are_todays_state():
    """The default draws no random bits and keeps no seed: its state dict is the one before."""
    model = tiny_model()
    opt = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2)
    for step in range(3):
        train_step(model, opt, step)
    assert all("round_seed" not in s for s in opt.state.values())
    assert {v.dtype for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "score")} == {
        torch.float32}


def test_stochastic_rounding_keeps_the_drift_of_small_updates():
    """bf16 parameters of magnitude ~0.02, lr 1e-5, a consistent-sign gradient, 20 steps:
    with rounding="stochastic" the mean drift is within 10% of fp32's; with "nearest" most
    updates are lost (under half a bf16 ulp)."""
    torch.manual_seed(0)
    start = torch.randn(128, 128) * 0.02
    drift = {}
    for name, dtype, kwargs in (("fp32", torch.float32, {}), ("nearest", torch.bfloat16, {}),
                                ("stochastic", torch.bfloat16, dict(rounding="stochastic")),
                                ("bf16 state", torch.bfloat16, dict(rounding="stochastic", state_dtype="bf16"))):
        param = nn.Parameter(start.to(dtype))
        before = param.detach().float().clone()
        opt = DPSAdamW([param], lr=1e-5, weight_decay=0.0, stage_steps=100, seed=3, **kwargs)
        for _ in range(20):
            param.grad = torch.ones_like(param)
            opt.step()
        drift[name] = (before - param.detach().float()).mean().item()
    assert abs(drift["stochastic"] / drift["fp32"] - 1) < 0.1
    assert abs(drift["bf16 state"] / drift["fp32"] - 1) < 0.1
    assert drift["nearest"] < 0.5 * drift["fp32"]


def _train(model, opt, steps, first=0):
    for step in range(first, first + steps):
        train_step(model, opt, step, clip=1.0)


def _bf16_model():
    return tiny_model().to(torch.bfloat16)


def test_a_resume_mid_stage_repeats_the_random_bits():
    """bf16 model, bf16 state, stochastic rounding: stop at step 5 (mid-stage), save,
    load into a new optimizer, go on: bit for bit the run that did not stop."""
    kwargs = dict(lr=1e-3, stage_steps=3, state_dtype="bf16", rounding="stochastic", seed=11)
    whole, first = _bf16_model(), _bf16_model()
    whole_opt, first_opt = DPSAdamW(param_groups(whole), **kwargs), DPSAdamW(param_groups(first), **kwargs)
    _train(whole, whole_opt, 10)
    _train(first, first_opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _bf16_model()
    resumed.load_state_dict(saved["model"])
    resumed_opt = DPSAdamW(param_groups(resumed), **kwargs)
    resumed_opt.load_state_dict(saved["opt"])
    for group in resumed_opt.param_groups:  # each parameter's seed is in its state: the group's no longer counts
        group["seed"] = 12345
    assert all(isinstance(s["round_seed"], int) for s in saved["opt"]["state"].values())
    _train(resumed, resumed_opt, 5, first=5)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert_same_state(whole_opt.state_dict()["state"], resumed_opt.state_dict()["state"])


@pytest.mark.parametrize("source,target", [("fp32", "bf16"), ("bf16", "fp32")])
def test_a_state_dict_of_either_format_loads_into_either(source, target):
    model = tiny_model()
    opt = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2, state_dtype=source)
    _train(model, opt, 3)
    saved = opt.state_dict()
    other = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2, state_dtype=target)
    other.load_state_dict(saved)
    assert other.param_groups[0]["state_dtype"] == target  # the group keeps its storage
    everything = [p for g in other.param_groups for p in g["params"]]
    for index, entry in saved["state"].items():
        param = everything[index]
        for key in ("exp_avg", "exp_avg_sq", "score"):
            if key in entry:
                loaded = other.state[param][key]
                assert loaded.dtype == state_format.of(target).dtype
                assert torch.equal(loaded, entry[key].to(loaded.dtype))  # converted to nearest
    _train(model, other, 2, first=3)


def test_an_adamw_state_with_bf16_moments_migrates_into_bf16_state():
    """torch.optim.AdamW keeps a bf16 parameter's moments in bf16: they load as they are."""
    model = _bf16_model()
    adamw = torch.optim.AdamW(param_groups(model), lr=1e-3)
    for step in range(2):
        train_step(model, adamw, step)
    saved = adamw.state_dict()
    opt = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2, state_dtype="bf16", rounding="stochastic")
    opt.load_state_dict(saved)
    everything = [p for g in opt.param_groups for p in g["params"]]
    index, param = 0, everything[0]
    assert opt.state[param]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(opt.state[param]["exp_avg"], saved["state"][index]["exp_avg"])
    _train(model, opt, 3, first=2)


def test_changing_a_groups_state_dtype_converts_its_state():
    model = tiny_model()
    opt = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2)
    _train(model, opt, 2)
    opt.param_groups[0]["state_dtype"] = "bf16"
    _train(model, opt, 2, first=2)
    managed = opt.param_groups[0]["params"][0]
    assert opt.state[managed]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[opt.param_groups[1]["params"][0]]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("kwargs,words", [
    (dict(state_dtype="fp16"), "state_dtype must be one of \\('fp32', 'bf16', '8bit'\\)"),
    (dict(rounding="up"), "rounding must be one of \\('nearest', 'stochastic'\\)"),
    (dict(seed=-1), "seed must be an integer in \\[0, 2\\*\\*32\\)"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_bad_storage_options(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DPSAdamW([nn.Parameter(torch.zeros(3))], stage_steps=2, **kwargs)
