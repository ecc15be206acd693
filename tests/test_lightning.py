"""dps_fast.integrations.lightning: DPSAdamW in a real lightning.Trainer (CPU).

Precisions: "32-true", "bf16-mixed" and "16-mixed". On the CPU Lightning
turns precision="16-mixed" into "bf16-mixed" (with a warning), so the fp16
runs pass its MixedPrecision("16-mixed", "cpu") plugin explicitly: fp16
autocast and a real torch.amp.GradScaler, the path a GPU run takes.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning", reason="lightning is not installed (pip install -e '.[lightning]')")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from dps_fast import DPSAdamW, param_groups  # noqa: E402
from dps_fast.integrations.lightning import (DPSLightningModule, _dps_of, clip_gradients,  # noqa: E402
                                             create_dps_optimizer, estimated_steps)
from training import assert_same_state, tiny_model  # noqa: E402

PRECISIONS = ["32-true", "bf16-mixed", "16-mixed"]
pytestmark = [
    pytest.mark.filterwarnings("error:gradients changed after clip_grad_norm_"),  # a clip that would be lost
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),  # inside Lightning
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),  # the resumed runs save nothing
]


def _loader(batches, batch=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 16, (batches * batch, 8), generator=generator)
    labels = (tokens[:, 0] > 7).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=batch)


class Tiny(DPSLightningModule, L.LightningModule):
    """A one-block TinyEncoder (random weights) trained with create_dps_optimizer."""

    def __init__(self, seed=0, lr=1e-2, **dps_kwargs):
        super().__init__()
        self.net = tiny_model(seed)
        self.lr, self.dps_kwargs = lr, dps_kwargs

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        return F.cross_entropy(self.net(tokens), labels)

    def configure_optimizers(self):
        return create_dps_optimizer(self, lr=self.lr, **self.dps_kwargs)


def _trainer(precision, tmp_path, **kwargs):
    if precision == "16-mixed":  # Lightning would run bf16 on the CPU
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu")]
    else:
        kwargs["precision"] = precision
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def _assert_same_params(a, b):
    """The parameters of modules a and b are equal, bit for bit."""
    a, b = list(a.parameters()), list(b.parameters())
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _confirmed_step(opt):
    """The DPS step count, confirmed (under a GradScaler the last one is provisional until read)."""
    return opt.state_dict()["param_groups"][0]["dps_step"]


class ExploitRecorder(L.Callback):
    """At each exploitation step: `weight` and its moments before and after the step, and the mask."""

    def __init__(self, weight):
        self.weight, self.records, self._before = weight, [], None

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if optimizer.phase == "exploit":
            state = optimizer.state[self.weight]
            self._before = dict(weight=self.weight.detach().clone(), exp_avg=state["exp_avg"].clone(),
                                exp_avg_sq=state["exp_avg_sq"].clone())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self._before is not None:
            opt = trainer.optimizers[0]
            state = opt.state[self.weight]
            self.records.append(dict(before=self._before, after=dict(
                weight=self.weight.detach().clone(), exp_avg=state["exp_avg"].clone(),
                exp_avg_sq=state["exp_avg_sq"].clone()), mask=opt.mask(self.weight)))
            self._before = None


@pytest.mark.parametrize("masked", ["freeze", "grad"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_fit_applies_masks_in_exploitation_stages(precision, masked, tmp_path):
    module = Tiny(sparsity=0.3, stage_ratio=0.25, masked=masked)
    weight = module.net.blocks[0].query.weight
    recorder = ExploitRecorder(weight)
    # 8 batches an epoch, 2 per optimizer step: 4 steps an epoch, 12 in all; T = int(0.25 * 12) = 3
    trainer = _trainer(precision, tmp_path, max_epochs=3, accumulate_grad_batches=2, gradient_clip_val=1.0,
                       callbacks=[recorder])
    trainer.fit(module, _loader(8))

    opt = trainer.optimizers[0]
    assert isinstance(opt, DPSAdamW) and trainer.global_step == 12
    assert opt.param_groups[0]["stage_steps"] == 3
    assert _confirmed_step(opt) == 12  # optimizer steps, not the 24 batches; no step skipped by the scaler
    beta1, beta2 = opt.param_groups[0]["betas"]
    assert len(recorder.records) == 6  # exploitation steps 4-6 and 10-12
    for record in recorder.records:
        before, after, mask = record["before"], record["after"], record["mask"]
        assert mask is not None and mask.sum() >= math.ceil(0.7 * mask.numel()) and not mask.all()
        moved = after["weight"] != before["weight"]
        assert moved[mask].float().mean() > 0.5  # trained inside the subnetwork
        if masked == "freeze":  # outside it: value and moments untouched
            assert not moved[~mask].any()
            assert torch.equal(after["exp_avg"][~mask], before["exp_avg"][~mask])
            assert torch.equal(after["exp_avg_sq"][~mask], before["exp_avg_sq"][~mask])
        else:  # outside it: a zero gradient, so the moments only decay, and momentum moves the weight
            torch.testing.assert_close(after["exp_avg"][~mask], beta1 * before["exp_avg"][~mask],
                                       rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(after["exp_avg_sq"][~mask], beta2 * before["exp_avg_sq"][~mask],
                                       rtol=1e-6, atol=1e-15)
            assert moved[~mask].float().mean() > 0.5
        # inside it the gradient reached the moments
        assert (after["exp_avg"][mask] != beta1 * before["exp_avg"][mask]).float().mean() > 0.5


class ClipRecorder(Tiny):
    """Tiny that records, after the mixin's clip, each step's gradients, masks and the norm it clipped."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.clips = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        norm = super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        exploit = optimizer.phase == "exploit"
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.clips.append(dict(
            exploit=exploit, norm=norm, grads=[p.grad.clone() for p in params],
            masks=[optimizer.mask(p) if exploit else None for p in params]))  # selected by the clip if new


def _hand_loop(precision, batches, epochs, clip, clip_fn, **dps_kwargs):
    """The same training as Tiny in a Trainer, written out: autocast, GradScaler, clip_fn (unless None), step."""
    net = Tiny(**dps_kwargs).net
    total = batches * epochs
    opt = DPSAdamW(param_groups(net), lr=1e-2, total_steps=total, **dps_kwargs)
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    loader = _loader(batches)
    for _ in range(epochs):
        for tokens, labels in loader:
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None,
                                cache_enabled=False):
                loss = F.cross_entropy(net(tokens), labels)
            opt.zero_grad()
            (loss if scaler is None else scaler.scale(loss)).backward()
            if clip_fn is not None:
                if scaler is not None:
                    scaler.unscale_(opt)
                clip_fn(opt, net, clip)
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
    return net, opt


def _masked_clip(opt, net, clip):
    opt.clip_grad_norm_(clip)


def _torch_clip(opt, net, clip):
    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gradient_clip_val_clips_the_masked_gradients(precision, tmp_path):
    clip, kwargs = 0.05, dict(sparsity=0.3, stage_ratio=0.25)
    module = ClipRecorder(**kwargs)
    trainer = _trainer(precision, tmp_path, max_epochs=2, gradient_clip_val=clip)  # 12 steps, T = 3
    trainer.fit(module, _loader(6))
    opt = trainer.optimizers[0]
    assert _confirmed_step(opt) == 12 and len(module.clips) == 12

    for record in module.clips:
        # the norm DPSAdamW.clip_grad_norm_ takes: of the masked gradients in exploitation stages
        # (unscaled under 16-mixed: the recorded gradients are the unscaled ones)
        masked = torch.stack([(g if m is None else g * m).float().norm() for g, m in
                              zip(record["grads"], record["masks"])]).norm()
        unmasked = torch.stack([g.float().norm() for g in record["grads"]]).norm()
        torch.testing.assert_close(record["norm"], masked, rtol=1e-5, atol=0)
        assert record["norm"] > clip  # the clip is active at every step
        if record["exploit"]:  # and torch's clip (of the unmasked norm) would differ
            assert sum(m is not None for m in record["masks"]) == len(opt.param_groups[0]["params"])
            assert unmasked > 1.01 * masked
        else:
            assert torch.equal(masked, unmasked)
    assert sum(r["exploit"] for r in module.clips) == 6

    # the Trainer's run is the hand-written loop with DPSAdamW.clip_grad_norm_ ...
    net, _ = _hand_loop(precision, 6, 2, clip, _masked_clip, **kwargs)
    _assert_same_params(module.net, net)
    # ... and not the loop with torch's clip of the unmasked gradients
    net, _ = _hand_loop(precision, 6, 2, clip, _torch_clip, **kwargs)
    assert not all(torch.equal(a, b) for a, b in zip(module.net.parameters(), net.parameters()))


def test_gradient_clip_by_value_under_grad_scaler(tmp_path):
    """gradient_clip_algorithm="value" unscales first and clips element-wise, as torch.nn.utils.clip_grad_value_."""
    clip, kwargs = 0.01, dict(sparsity=0.3, stage_ratio=0.25)
    module = Tiny(**kwargs)
    trainer = _trainer("16-mixed", tmp_path, max_epochs=2, gradient_clip_val=clip, gradient_clip_algorithm="value")
    trainer.fit(module, _loader(6))

    def value_clip(opt, net, clip):
        torch.nn.utils.clip_grad_value_(net.parameters(), clip)

    net, _ = _hand_loop("16-mixed", 6, 2, clip, value_clip, **kwargs)
    _assert_same_params(module.net, net)


def test_fit_without_clip_under_grad_scaler(tmp_path):
    """No gradient_clip_val under 16-mixed: nothing unscales on the host, DPSAdamW unscales in its step."""
    kwargs = dict(sparsity=0.3, stage_ratio=0.25)
    module = Tiny(**kwargs)
    trainer = _trainer("16-mixed", tmp_path, max_epochs=2)
    trainer.fit(module, _loader(6))
    assert _confirmed_step(trainer.optimizers[0]) == 12
    net, _ = _hand_loop("16-mixed", 6, 2, None, None, **kwargs)
    _assert_same_params(module.net, net)


def _opt_state(opt):
    """Every tensor and number of opt's state, by parameter index (masks unpacked)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, p in enumerate(params):
        entry = dict(opt.state.get(p, {}))
        entry.pop("mask", None)
        state[i] = dict(entry, mask=opt.mask(p))
    return state


@pytest.mark.parametrize("precision", PRECISIONS)
def test_resume_from_checkpoint_continues_the_schedule(precision, tmp_path):
    """A run resumed with fit(ckpt_path=...) from an end-of-epoch checkpoint, mid-stage, ends bit for bit
    where the uninterrupted run ends: parameters, step counts, moments, scores, masks (and the GradScaler).

    4 steps an epoch, 4 epochs, T = int(0.2 * 16) = 3: stages 1-3 explore, 4-6 exploit, 7-9 explore,
    10-12 exploit, 13-15 explore, 16 exploits. The checkpoint after step 4 holds the mask selected at
    step 4 (steps 5-6 must use it); the one after step 8 holds half an exploration stage of scores
    (the mask selected at step 10 depends on them)."""
    kwargs = dict(sparsity=0.3, stage_ratio=0.2, masked="grad")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    full = Tiny(**kwargs)
    trainer = _trainer(precision, tmp_path, max_epochs=4, gradient_clip_val=0.5, enable_checkpointing=True,
                       callbacks=[saver])
    trainer.fit(full, _loader(4))
    full_opt = trainer.optimizers[0]
    assert _confirmed_step(full_opt) == 16 and full_opt.param_groups[0]["stage_steps"] == 3
    scaler = getattr(trainer.precision_plugin, "scaler", None)

    for epoch, step in [(0, 4), (1, 8)]:
        ckpt = tmp_path / "ckpt" / f"epoch={epoch}-step={step}.ckpt"
        saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
        assert saved["param_groups"][0]["dps_step"] == step
        resumed = Tiny(seed=1, **kwargs)  # other initial weights: they must come from the checkpoint
        again = _trainer(precision, tmp_path, max_epochs=4, gradient_clip_val=0.5)
        again.fit(resumed, _loader(4), ckpt_path=ckpt)
        opt = again.optimizers[0]
        assert again.global_step == 16 and _confirmed_step(opt) == 16
        assert opt.param_groups[0]["stage_steps"] == 3 and opt.phase == full_opt.phase
        _assert_same_params(full, resumed)
        assert_same_state(_opt_state(full_opt), _opt_state(opt))
        if scaler is not None:
            assert again.precision_plugin.scaler.state_dict() == scaler.state_dict()
    assert full_opt.mask(full.net.pooler.weight) is not None


class Manual(Tiny):
    """Tiny with manual optimization: clip_gradients(self, opt, ...) between manual_backward and step."""

    def __init__(self, clip, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.clip = clip

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        tokens, labels = batch
        loss = F.cross_entropy(self.net(tokens), labels)
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_step(opt)
        opt.step()

    def clip_step(self, opt):
        clip_gradients(self, opt, self.clip)  # opt: a LightningOptimizer; unscales under "16-mixed"


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_manual_optimization_clip_gradients(precision, tmp_path):
    clip, kwargs = 0.05, dict(sparsity=0.3, stage_ratio=0.25)
    manual, automatic = Manual(clip, **kwargs), Tiny(**kwargs)
    _trainer(precision, tmp_path, max_epochs=2).fit(manual, _loader(6))
    _trainer(precision, tmp_path, max_epochs=2, gradient_clip_val=clip).fit(automatic, _loader(6))
    _assert_same_params(manual, automatic)


def test_mix_variant_fits_twice(tmp_path):
    """variant="mix": the module is attached for mixing; a second fit (configure_optimizers again) re-attaches."""
    module = Tiny(sparsity=0.3, stage_steps=2, variant="mix")
    for _ in range(2):
        trainer = _trainer("32-true", tmp_path, max_epochs=1, gradient_clip_val=1.0)
        trainer.fit(module, _loader(4))
        opt = trainer.optimizers[0]
        assert _confirmed_step(opt) == 4 and opt.mask(module.net.pooler.weight) is not None
        tokens = next(iter(_loader(1)))[0]
        module.train()
        with torch.no_grad():  # on_fit_end detached the mixing: train mode computes with the weights
            assert torch.equal(module.net(tokens), module.net(tokens))
    assert all(torch.isfinite(p).all() for p in module.parameters())


class ManualWrapperClip(Manual):
    """Manual optimization clipping through the LightningOptimizer's own clip_grad_norm_."""

    def clip_step(self, opt):
        opt.clip_grad_norm_(self.clip)  # the wrapper shares DPSAdamW's pending clip


def test_manual_optimization_clip_through_the_wrapper(tmp_path):
    clip, kwargs = 0.05, dict(sparsity=0.3, stage_ratio=0.25)
    wrapper, manual, unclipped = ManualWrapperClip(clip, **kwargs), Manual(clip, **kwargs), Manual(0, **kwargs)
    for module in (wrapper, manual, unclipped):
        _trainer("32-true", tmp_path, max_epochs=2).fit(module, _loader(6))
    _assert_same_params(wrapper, manual)
    assert any(not torch.equal(a, b) for a, b in zip(manual.parameters(), unclipped.parameters()))


def test_create_dps_optimizer_stage_length(tmp_path):
    module = Tiny()
    with pytest.raises(RuntimeError, match="not attached to a Trainer"):
        create_dps_optimizer(module)
    opt = create_dps_optimizer(module, stage_steps=7)  # no Trainer needed
    assert opt.param_groups[0]["stage_steps"] == 7
    module.trainer = L.Trainer(max_epochs=-1, logger=False, enable_progress_bar=False)  # no end
    with pytest.raises(ValueError, match="not known"):
        estimated_steps(module)
    module.trainer = L.Trainer(max_steps=40, logger=False, enable_progress_bar=False)
    assert create_dps_optimizer(module, stage_ratio=0.1).param_groups[0]["stage_steps"] == 4
    assert create_dps_optimizer(module, total_steps=100).param_groups[0]["stage_steps"] == 5


def test_pytorch_lightning_namespace(tmp_path):
    """The same mixin with the `pytorch_lightning` package (the issue's case: bf16-mixed and gradient_clip_val)."""
    pl = pytest.importorskip("pytorch_lightning")

    class PLTiny(DPSLightningModule, pl.LightningModule):
        training_step, configure_optimizers = Tiny.training_step, Tiny.configure_optimizers

        def __init__(self, **kwargs):
            super().__init__()
            self.net = tiny_model(0)
            self.lr, self.dps_kwargs = 1e-2, kwargs

    clip, kwargs = 0.05, dict(sparsity=0.3, stage_ratio=0.25)
    module = PLTiny(**kwargs)
    pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_epochs=2, gradient_clip_val=clip,
               logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=tmp_path).fit(module, _loader(6))
    net, _ = _hand_loop("bf16-mixed", 6, 2, clip, _masked_clip, **kwargs)
    _assert_same_params(module.net, net)


class Plain(L.LightningModule):
    """A LightningModule without the mixin."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def configure_optimizers(self):
        return create_dps_optimizer(self, stage_steps=2)


def test_create_dps_optimizer_warns_without_the_mixin():
    module = Plain()
    module.trainer = L.Trainer(max_steps=8, gradient_clip_val=1.0, logger=False, enable_progress_bar=False)
    with pytest.warns(UserWarning, match="unmasked gradients"):
        module.configure_optimizers()
    module.trainer = L.Trainer(max_steps=8, logger=False, enable_progress_bar=False)  # no clip: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.configure_optimizers()
        tiny = Tiny(stage_steps=2)
        tiny.trainer = L.Trainer(max_steps=8, gradient_clip_val=1.0, logger=False, enable_progress_bar=False)
        tiny.configure_optimizers()


def test_mixin_leaves_other_optimizers_to_lightning(tmp_path):
    """With a torch.optim.AdamW the mixin clips as Lightning does: torch's clip of every gradient."""

    class WithAdamW(Tiny):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.lr)

    clip, module = 0.05, WithAdamW()
    _trainer("32-true", tmp_path, max_epochs=1, gradient_clip_val=clip).fit(module, _loader(3))
    net = Tiny().net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for tokens, labels in _loader(3):
        opt.zero_grad()
        F.cross_entropy(net(tokens), labels).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
    _assert_same_params(module.net, net)


def test_mixin_before_lightning_module():
    with pytest.raises(TypeError, match="before LightningModule"):
        class Wrong(L.LightningModule, DPSLightningModule):
            pass


def test_bf16_true_with_bf16_state_and_stochastic_rounding(tmp_path):
    """precision="bf16-true": the module held in bf16, DPSAdamW with bf16 state and stochastic
    stores; the Trainer's run is the hand-written bf16 loop, bit for bit."""
    kwargs = dict(sparsity=0.3, stage_ratio=0.25, state_dtype="bf16", rounding="stochastic")  # DPSAdamW's seed: 0
    module = Tiny(**kwargs)
    _trainer("bf16-true", tmp_path, max_epochs=2, gradient_clip_val=1.0).fit(module, _loader(6))
    opt = _dps_of(module.trainer.optimizers[0])
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert opt.state[module.net.pooler.weight]["exp_avg"].dtype == torch.bfloat16
    net = Tiny(**kwargs).net.to(torch.bfloat16)
    hand = DPSAdamW(param_groups(net), lr=1e-2, total_steps=12, **kwargs)
    for _ in range(2):
        for tokens, labels in _loader(6):
            loss = F.cross_entropy(net(tokens), labels)
            hand.zero_grad()
            loss.backward()
            hand.clip_grad_norm_(1.0)
            hand.step()
    _assert_same_params(module.net, net)
