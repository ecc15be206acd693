"""DPS-Mix's forward-side mixing (dps_fast/mix.py): which modules it mixes, under
torch.compile, and nn.MultiheadAttention (whose forward never calls its out_proj's)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dps_fast import DPSAdamW, mix, param_groups
from training import batch, tiny_model


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(x)[:, 0])


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(models, x, y, steps):
    """Step (model, forward, optimizer) triples on the same batch and mixing draws;
    after every step the parameters of all models must agree within 1e-6."""
    for step in range(steps):
        for _, forward, opt in models:
            torch.manual_seed(step)  # the same Bernoulli draws for every model
            loss = F.cross_entropy(forward(x), y)
            opt.zero_grad()
            loss.backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
        first = list(models[0][0].parameters())
        for model, _, _ in models[1:]:
            for a, b in zip(first, model.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"step {step + 1}: {m}")


def _mixed(model, compile_backend=None):
    opt = DPSAdamW(param_groups(model), lr=1e-2, stage_steps=2, variant="mix", backend="torch")
    opt.attach_mix(model)
    return model, torch.compile(model, backend=compile_backend) if compile_backend else model, opt


@pytest.mark.parametrize("compile_backend", ["eager", "inductor"])
@pytest.mark.parametrize("make", [_mlp, _Attention], ids=["three-linears", "transformer-layer"])
def test_compiled_model_mixes_as_eager(make, compile_backend):
    """Across two stage boundaries (stages of 2 steps: explore 1-2, exploit 3-4, explore 5-6),
    torch.compile(model) trains exactly as the eager model (the mixing runs eagerly)."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(8, 5, 16) if make is _Attention else torch.randn(32, 8)
    y = torch.randint(0, 3, (x.shape[0],))
    eager, compiled = _mixed(copy.deepcopy(model)), _mixed(model, compile_backend)
    _train([eager, compiled], x, y, steps=6)
    assert compiled[2].mask(model[0].weight if make is _mlp else model.layer.self_attn.in_proj_weight) is not None


def test_multihead_attention_is_mixed():
    torch.manual_seed(1)
    model = _Attention()
    _, _, opt = _mixed(model)
    attention = model.layer.self_attn
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        model.eval()
        plain = model(x)
        for tensor in (attention.in_proj_weight, attention.out_proj.weight):  # W0 differs from W now
            tensor.add_(0.1)
        model.train()
        torch.manual_seed(0)
        mixed = model(x)
    assert not torch.allclose(plain, mixed)  # the train-mode forward computes with W_eff
    loss = model(x).sum()
    loss.backward()
    for tensor in (attention.in_proj_weight, attention.out_proj.weight):  # the managed ones (not biases)
        assert opt.state[tensor]["mix_calls"] >= 1, "no mixed backward reached it"
    opt.step()
    assert opt.state[attention.in_proj_weight]["mix_count"].shape == (16,)  # per input column


def test_tensors_it_cannot_mix_are_named():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32,
                                                                 n_positions=8, bos_token_id=0, eos_token_id=0))
    opt = DPSAdamW(param_groups(model), stage_steps=2, variant="mix")
    with pytest.raises(ValueError, match=r"nn\.Linear and nn\.MultiheadAttention.*transformer\.h\.0\.attn\.c_attn"
                                         r"\.weight.*variant='dense'"):
        opt.attach_mix(model)


def test_mix_eval_uses_raw_weights_and_train_mixes():
    model = tiny_model()
    opt = DPSAdamW(param_groups(model), stage_steps=2, variant="mix", sparsity=0.5)
    tokens, _ = batch(0)
    model.eval()
    with torch.no_grad():
        plain = model(tokens)
    handle = opt.attach_mix(model)  # W0 captured here
    with torch.no_grad():
        for group in opt.param_groups[:1]:
            for param in group["params"]:
                param.mul_(1.5)  # W moves away from W0, so mixing toward W0 shows
        model.eval()
        plain = model(tokens)
        assert torch.equal(model(tokens), plain)  # eval: W itself
        model.train()
        assert not torch.allclose(model(tokens), plain)  # train: random mixing
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(tokens), plain)


def test_mix_requires_attach():
    model = tiny_model()
    opt = DPSAdamW(param_groups(model), stage_steps=2, variant="mix")
    tokens, labels = batch(0)
    F.cross_entropy(model(tokens), labels).backward()
    with pytest.raises(RuntimeError, match="attach_mix"):
        opt.step()
    assert opt.param_groups[0]["dps_step"] == 0 and not opt.state


def test_mix_attach_twice_raises():
    model = tiny_model()
    opt = DPSAdamW(param_groups(model), stage_steps=2, variant="mix")
    opt.attach_mix(model)
    with pytest.raises(RuntimeError, match="already mixed by this DPSAdamW \\(attach_mix called twice"):
        opt.attach_mix(model)


@pytest.mark.parametrize("adamw_steps", [0, 2])  # 0: a state dict without entries
def test_a_torch_adamw_state_loaded_after_attach_keeps_w0(adamw_steps):
    # attach_mix records W0; an AdamW state dict has none, and loading it must not lose it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2))
    inputs, labels = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
    adamw = torch.optim.AdamW(param_groups(model), lr=1e-3)
    for _ in range(adamw_steps):
        adamw.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        adamw.step()
    opt = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2, variant="mix")
    w0 = model[0].weight.detach().clone()
    opt.attach_mix(model)
    opt.load_state_dict(adamw.state_dict())
    for _ in range(5):  # explore, exploit, explore: both mixing targets are used
        opt.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        opt.step()
    assert torch.equal(opt.state[model[0].weight]["mix_init"], w0)
    assert opt.state[model[0].weight]["step"] == adamw_steps + 5


# ----- modules whose forward is their own: subclasses, hooks, parametrizations ----------

class _Scaled(nn.Linear):
    """A Linear subclass with a forward of its own (as scaled, fake-quantised or LoRA-style layers have)."""

    def forward(self, x):
        return super().forward(x) * 10.0


@pytest.mark.parametrize("make", [lambda: nn.Sequential(_Scaled(8, 4)), _Attention], ids=["linear-subclass", "mha"])
def test_the_modules_own_forward_runs_on_the_mixed_tensors(make):
    """At sparsity ~0 the mixed tensors equal the weights: train mode must give what the
    module's own forward gives, and its forward hooks must run once per call."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(3, 5, 16) if make is _Attention else torch.randn(3, 8)
    calls = []
    module = model.layer.self_attn if make is _Attention else model[0]
    module.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        own = model(x)
    opt = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2, variant="mix", sparsity=1e-6)
    opt.attach_mix(model)
    calls.clear()
    with torch.no_grad():
        mixed = model(x)
    torch.testing.assert_close(mixed, own, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


def test_an_instance_forward_set_before_attach_is_kept_and_restored():
    """A forward replaced on the instance before attach_mix (as hooks libraries do) runs
    inside the mixing and is what remove() gives back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    linear = model[0]
    linear.forward = lambda x: nn.Linear.forward(linear, x) + 1.0
    x = torch.randn(2, 8)
    with torch.no_grad():
        own = model(x)
    opt = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2, variant="mix", sparsity=1e-6)
    handle = opt.attach_mix(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), own, rtol=1e-5, atol=1e-5)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(x), own)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x, step):
        return (self.a if step % 2 else self.b)(self.body(x))


def test_a_layer_unused_in_a_step_is_updated_as_its_zero_gradient_says():
    """zero_grad(set_to_none=False) and two heads used in alternate steps: each step the
    unused head has a zero gradient and no mixed backward; DPS-Mix trains as dense does."""
    torch.manual_seed(0)
    model = _TwoHeads()
    opt = DPSAdamW(param_groups(model), lr=1e-2, stage_steps=2, variant="mix")
    opt.attach_mix(model)
    x = torch.randn(3, 4)
    for step in range(6):  # explore 1-2, exploit 3-4, explore 5-6; head b in steps 1, 3, 5, head a in 2, 4, 6
        if step == 5:
            before = {key: opt.state[model.b.weight][key].clone() for key in ("mix_count", "exp_avg", "score")}
        opt.zero_grad(set_to_none=False)
        model(x, step).sum().backward()
        opt.step()
    assert opt.mask(model.a.weight) is not None and opt.mask(model.b.weight) is not None
    state = opt.state[model.b.weight]  # unused in step 6, an exploration step: a zero gradient
    assert state["step"] == 6 and opt.state[model.a.weight]["step"] == 5  # a has had a gradient since step 2
    assert torch.equal(state["mix_count"], before["mix_count"])  # kept nothing
    assert torch.equal(state["score"], before["score"])  # += 0
    torch.testing.assert_close(state["exp_avg"], 0.9 * before["exp_avg"])


def test_a_model_left_in_eval_mode_is_named():
    model = _TwoHeads()
    opt = DPSAdamW(param_groups(model), lr=1e-2, stage_steps=2, variant="mix")
    opt.attach_mix(model)
    model.eval()
    model(torch.randn(3, 4), 0).sum().backward()
    with pytest.raises(RuntimeError, match="in eval mode.*model.train\\(\\)"):
        opt.step()
    assert opt.param_groups[0]["dps_step"] == 0


def test_detach_mix_restores_every_module_and_a_new_optimizer_attaches():
    model = _mlp()
    x = torch.randn(4, 8)
    model.eval()
    with torch.no_grad():
        plain = model(x)
    model.train()
    first = DPSAdamW(param_groups(model), lr=1e-2, stage_steps=2, variant="mix", sparsity=0.5)
    first.attach_mix(model)
    with pytest.raises(RuntimeError, match="already mixed by another DPSAdamW"):
        DPSAdamW(param_groups(model), lr=1e-2, stage_steps=2, variant="mix").attach_mix(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # W moves away from W0: mixing would show
        plain = model.eval()(x)
        model.train()
        assert not torch.allclose(model(x), plain)
        first.detach_mix()
        assert torch.equal(model(x), plain)  # training mode, no mixing left
    DPSAdamW(param_groups(model), lr=1e-2, stage_steps=2, variant="mix").attach_mix(model)


def test_a_head_unused_when_a_stage_begins_targets_w_as_it_began():
    """The exploitation target is W at the stage's first step, also for a tensor that the
    first forward of the stage does not use (its snapshot is then taken by step())."""
    torch.manual_seed(0)
    model = _TwoHeads()
    opt = DPSAdamW(param_groups(model), lr=1e-2, stage_steps=2, variant="mix")
    opt.attach_mix(model)
    x = torch.randn(3, 4)
    for step in range(4):  # exploitation starts at step 3, which uses head b only
        if step == 2:
            at_stage_start = model.a.weight.detach().clone()
        opt.zero_grad(set_to_none=False)
        model(x, step).sum().backward()
        opt.step()
    state = opt.state[model.a.weight]
    assert state["snapshot_stage"] == 3 and torch.equal(state["mix_snapshot"], at_stage_start)


def test_a_parametrized_weight_beside_a_mixed_bias():
    """Only registered parameters are swapped for their mixed tensors: a Linear whose
    weight is parametrized mixes its bias and computes its weight as usual."""
    torch.manual_seed(0)
    linear = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4))
    model = nn.Sequential(linear)
    opt = DPSAdamW([{"params": [linear.bias], "variant": "mix"},
                    {"params": [linear.parametrizations.weight.original], "dps": False}], lr=1e-2, stage_steps=2)
    opt.attach_mix(model)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    assert opt.state[linear.bias]["step"] == 3


def test_a_copy_of_a_mixed_model_is_detached():
    """mix.detach works on a deepcopy of a mixed model (whose optimizer copy holds no handle)."""
    model = _mlp()
    DPSAdamW(param_groups(model), lr=1e-2, stage_steps=2, variant="mix").attach_mix(model)
    copied = copy.deepcopy(model)
    mix.detach(copied)
    assert not any("forward" in m.__dict__ for m in copied.modules())
    DPSAdamW(param_groups(copied), lr=1e-2, stage_steps=2, variant="mix").attach_mix(copied)


def test_a_parametrized_weight_is_refused_by_name():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="original0"):  # weight_norm's g (param_groups' rule)
        groups = param_groups(model)
    opt = DPSAdamW(groups, lr=1e-2, stage_steps=2, variant="mix")
    with pytest.raises(ValueError, match="parametrized weight: 0.parametrizations.weight.original1"):
        opt.attach_mix(model)
