"""dps_fast.integrations.hf: DPSAdamW in a real transformers.Trainer."""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e '.[test]')")

from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from dps_fast import DPSAdamW, param_groups  # noqa: E402
from dps_fast.data import INSTALL_HINT, MissingPackage  # noqa: E402
from dps_fast.tiny import TinyEncoder  # noqa: E402
from dps_fast.integrations.hf import DPSTrainer, MaskedClipCallback, unwrap_optimizer  # noqa: E402
from training import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def bundled():
    """(model with a 6-way head, 24 TREC-6 examples) from the bundled packages."""
    from dps_fast.data import load_split
    from dps_fast.finetune import load_model

    try:
        split = load_split("trec", train_size=24)
        tokenizer, model = load_model(num_labels=6)
    except MissingPackage:
        pytest.skip(f"bundled data/model packages missing: {INSTALL_HINT}")
    encoded = tokenizer(split.train_texts, truncation=True, max_length=16, padding="max_length")
    data = [{"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(label)}
            for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], split.train_labels)]
    return model, data


class ExploitRecorder(TrainerCallback):
    """At each exploitation step: the weight before and after step(), the mask, the pending clip factor."""

    def __init__(self, weight):
        self.weight, self.records, self._before = weight, [], None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt, _ = unwrap_optimizer(optimizer)
        if opt.phase == "exploit":
            self._before = (self.weight.detach().clone(), opt._runtime.pending_clip)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt, _ = unwrap_optimizer(optimizer)
        if self._before is not None:
            before, pending = self._before
            self.records.append(dict(before=before, after=self.weight.detach().clone(),
                                     mask=opt.mask(self.weight), pending=pending))
            self._before = None


def test_trainer_applies_masks_in_exploitation_stages(bundled, tmp_path):
    model, data = bundled
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    torch.manual_seed(0)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             num_train_epochs=4, learning_rate=1e-4, weight_decay=0.01, max_grad_norm=1.0,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             dataloader_drop_last=False)
    # masked="freeze" makes "the mask was applied" visible: masked-out entries do not move at all
    trainer = DPSTrainer(model=model, args=args, train_dataset=data,
                         dps_kwargs=dict(sparsity=0.3, stage_ratio=0.25, masked="freeze"))
    recorder = ExploitRecorder(weight)
    trainer.add_callback(recorder)  # after DPSTrainer's own clip callback
    trainer.train()

    opt = trainer.dps_optimizer
    # 24 examples / 4 per batch / 2 accumulation = 3 optimizer steps per epoch, 4 epochs
    assert trainer.state.max_steps == 12 and trainer.state.global_step == 12
    assert opt.param_groups[0]["stage_steps"] == int(0.25 * 12) == 3
    assert opt.param_groups[0]["dps_step"] == 12  # optimizer steps, not the 24 forward passes
    # exploitation steps 4-6 and 10-12
    assert len(recorder.records) == 6
    for record in recorder.records:
        mask, moved = record["mask"], record["after"] != record["before"]
        assert mask is not None and mask.sum() >= math.ceil(0.7 * mask.numel())
        assert not moved[~mask].any()  # frozen outside the subnetwork
        assert moved[mask].float().mean() > 0.5  # and trained inside it
        assert record["pending"] is not None  # the masked clip was set for this step
    # clipping moved from the Trainer to DPSAdamW, on a copy of the arguments
    assert trainer.args.max_grad_norm == 0 and args.max_grad_norm == 1.0


class _Wrapped:
    """What a callback receives from an fp16 Trainer: accelerate's optimizer wrapper with its GradScaler."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler


@pytest.mark.parametrize("trainer_unscaled", [False, True])
def test_masked_clip_under_grad_scaler_matches_unscaled_training(trainer_unscaled):
    """fp16 path: the callback clips unscaled gradients (unscaling itself only
    if the Trainer did not), and scaler.step then applies the same update as
    training without a scaler; an inf gradient skips the step entirely."""
    scaled_model, plain_model = tiny_model(), tiny_model()
    kwargs = dict(lr=1e-2, stage_steps=2)
    scaled, plain = DPSAdamW(param_groups(scaled_model), **kwargs), DPSAdamW(param_groups(plain_model), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    callback = MaskedClipCallback(0.5)
    args = TrainingArguments("unused", max_grad_norm=0.0, report_to=[], use_cpu=True)
    for step in range(1, 7):
        tokens = torch.randint(0, 16, (8, 8), generator=torch.Generator().manual_seed(step))
        labels = (tokens[:, 0] > 7).long()
        scaled.zero_grad()
        scaler.scale(F.cross_entropy(scaled_model(tokens), labels)).backward()
        if trainer_unscaled:
            scaler.unscale_(scaled)  # transformers 5 does this in its grad-norm logging
        callback.on_pre_optimizer_step(args, None, None, optimizer=_Wrapped(scaled, scaler))
        scaler.step(scaled)
        scaler.update()
        plain.zero_grad()
        F.cross_entropy(plain_model(tokens), labels).backward()
        plain.clip_grad_norm_(0.5)
        plain.step()
    for a, b in zip(scaled_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert scaled.param_groups[0]["dps_step"] == 6

    # an overflow: nothing happens, not even the step count
    before = [p.detach().clone() for p in scaled_model.parameters()]
    scaled.zero_grad()
    scaler.scale(F.cross_entropy(scaled_model(tokens), labels)).backward()
    next(scaled_model.parameters()).grad[0] = float("inf")
    callback.on_pre_optimizer_step(args, None, None, optimizer=_Wrapped(scaled, scaler))
    scaler.step(scaled)
    scaler.update()
    assert scaled.state_dict()["param_groups"][0]["dps_step"] == 6  # state_dict() reads found_inf
    assert all(torch.equal(a, b) for a, b in zip(before, scaled_model.parameters()))


def _tiny_data(count=16):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (count, 8), generator=generator)
    return [{"tokens": t, "labels": (t[0] > 7).long()} for t in tokens]


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = TinyEncoder(vocab=16, dim=16, layers=1, heads=2, length=8)

    def forward(self, tokens, labels=None):
        logits = self.encoder(tokens)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_trainer_takes_stage_steps_from_dps_kwargs(tmp_path):
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, report_to=[],
                             save_strategy="no", use_cpu=True)
    trainer = DPSTrainer(model=_Classifier(), args=args, train_dataset=_tiny_data(), dps_kwargs=dict(stage_steps=2))
    trainer.train()
    opt = trainer.dps_optimizer
    assert opt.param_groups[0]["stage_steps"] == 2 and opt.param_groups[0]["dps_step"] == 4


def test_trainer_refuses_an_optimizer_choice_it_would_ignore(tmp_path):
    args = TrainingArguments(str(tmp_path), optim="adafactor", report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"TrainingArguments\(optim='adafactor'\) would be ignored"):
        DPSTrainer(model=_Classifier(), args=args, train_dataset=_tiny_data())


def test_a_mix_trainers_mixing_ends_with_its_train(tmp_path):
    """variant="mix": after train() the model computes with its own weights in training
    mode too (no stale Mixout toward the finished run's W0); a second DPSTrainer on the
    same model trains, and so does a second train() of the first."""
    model = _Classifier()
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, report_to=[],
                             save_strategy="no", use_cpu=True)
    tokens = torch.stack([row["tokens"] for row in _tiny_data(4)])

    def train_mode_forwards_agree():
        model.train()
        with torch.no_grad():
            return torch.equal(model.encoder(tokens), model.encoder(tokens))  # no dropout: only mixing differs

    first = DPSTrainer(model=model, args=args, train_dataset=_tiny_data(), dps_kwargs=dict(stage_steps=2,
                                                                                       variant="mix"))
    first.train()
    assert first.dps_optimizer.param_groups[0]["dps_step"] == 4 and train_mode_forwards_agree()
    second = DPSTrainer(model=model, args=args, train_dataset=_tiny_data(), dps_kwargs=dict(stage_steps=2,
                                                                                        variant="mix"))
    second.train()
    assert second.dps_optimizer.param_groups[0]["dps_step"] == 4 and train_mode_forwards_agree()
    first.train()  # its optimizer again: attached for the run, detached after
    assert first.dps_optimizer.param_groups[0]["dps_step"] == 8 and train_mode_forwards_agree()


def test_an_optimizer_made_before_train_and_a_users_own_one(tmp_path):
    """An optimizer created (and attached) before train() is not attached twice; a user's
    own optimizer (not a DPSAdamW) with max_grad_norm=0 trains as with a plain Trainer."""
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, report_to=[],
                             save_strategy="no", use_cpu=True)
    trainer = DPSTrainer(model=_Classifier(), args=args, train_dataset=_tiny_data(),
                         dps_kwargs=dict(stage_steps=2, variant="mix"))
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    trainer.train()
    assert trainer.dps_optimizer.param_groups[0]["dps_step"] == 4
    model = _Classifier()
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, report_to=[],
                             save_strategy="no", use_cpu=True, max_grad_norm=0.0)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    DPSTrainer(model=model, args=args, train_dataset=_tiny_data(), optimizers=(adamw, None)).train()
    assert adamw.state[next(model.parameters())]["step"] == 4


def test_trainer_with_a_bf16_model(tmp_path):
    """A model held in bf16 (bf16=True), DPSAdamW with bf16 state and stochastic stores: it
    trains in the Trainer (4 steps: explore, exploit), its state is bf16, and updates below
    half a bf16 ulp move weights, where rounding to nearest loses them."""
    moved = {}
    for rounding in ("stochastic", "nearest"):
        model = _Classifier().to(torch.bfloat16)
        before = [p.detach().clone() for p in model.parameters()]
        args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, report_to=[],
                                 save_strategy="no", use_cpu=True, bf16=True, learning_rate=1e-5)
        trainer = DPSTrainer(model=model, args=args, train_dataset=_tiny_data(),
                             dps_kwargs=dict(stage_steps=2, state_dtype="bf16", rounding=rounding))
        trainer.train()
        opt = trainer.dps_optimizer
        weight = model.encoder.blocks[0].query.weight
        assert weight.dtype == torch.bfloat16 and opt.state[weight]["exp_avg"].dtype == torch.bfloat16
        assert opt.mask(weight) is not None and opt.param_groups[0]["dps_step"] == 4
        moved[rounding] = torch.cat([(a != b).flatten() for a, b in zip(before, model.parameters())]).float().mean()
    assert moved["stochastic"] > 2 * moved["nearest"], moved


def test_trl_sft_trainer_on_a_tiny_bf16_llama(tmp_path):
    """TRL's SFTTrainer with a DPSAdamW of its own (create_dps_optimizer, MaskedClipCallback,
    max_grad_norm=0), on a Llama built from a config and held in bf16: bf16 state, stochastic
    stores, stages of 2 steps."""
    pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[test]')")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from dps_fast.integrations.hf import create_dps_optimizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=32)).to(torch.bfloat16)
    vocab = {f"t{i}": i for i in range(62)} | {"<pad>": 62, "</s>": 63}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                        pad_token="<pad>", eos_token="</s>")
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": [torch.randint(0, 62, (16,), generator=generator).tolist()
                                            for _ in range(32)]})
    args = SFTConfig(str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1, max_grad_norm=0.0,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=True, learning_rate=1e-4,
                     dataset_kwargs={"skip_prepare_dataset": True})
    opt = create_dps_optimizer(model, args, num_training_steps=4, stage_steps=2, state_dtype="bf16",
                               rounding="stochastic")
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, optimizers=(opt, None),
               callbacks=[MaskedClipCallback(1.0)]).train()
    query = model.model.layers[0].self_attn.q_proj.weight
    assert opt.param_groups[0]["dps_step"] == 4 and opt.mask(query) is not None
    assert opt.state[query]["exp_avg"].dtype == torch.bfloat16 and query.dtype == torch.bfloat16
