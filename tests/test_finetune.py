"""`dps-fast finetune`: the bundled data, the baselines on DPSAdamW's machinery, one run.

The command line is tested in test_finetune_cli.py, the tables and the plot in test_finetune_report.py."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dps_fast import DPSAdamW, param_groups
from dps_fast.baselines import (METHODS, ChildTuningAdamW, MixoutAdamW, build_optimizer, childtuning_groups,
                                fisher_masks)
from dps_fast.data import INSTALL_HINT, MissingPackage


def _bundled_or_skip():
    from dps_fast.data import load_split, model_dir

    try:
        model_dir()
        return load_split
    except MissingPackage:
        pytest.skip(f"bundled data/model packages missing: {INSTALL_HINT}")


# ----- data -------------------------------------------------------------------------

def test_mr_and_trec_splits_are_fixed_and_disjoint():
    load_split = _bundled_or_skip()
    mr = load_split("mr")
    assert len(mr.dev_texts) == 1000 and len(mr.train_texts) + len(mr.dev_texts) == 10568  # ratings != 0
    assert set(mr.train_labels) == {0, 1} and mr.label_names == ("negative", "positive")
    trec = load_split("trec")
    assert len(trec.dev_texts) == 500 and len(trec.train_texts) + len(trec.dev_texts) == 5381  # de-duplicated
    assert set(trec.train_labels) == set(range(6))
    for split in (mr, trec):
        assert not set(split.train_texts) & set(split.dev_texts)
        assert all("\r" not in t for t in split.train_texts + split.dev_texts)
    small = load_split("trec", train_size=100, dev_size=50)
    assert small.train_texts == trec.train_texts[:100] and small.dev_texts == trec.dev_texts[:50]
    assert load_split("trec", train_size=100).train_labels == small.train_labels
    with pytest.raises(ValueError, match="task"):
        load_split("sst2")


def test_out_of_domain_sets_are_fixed_sentiment_sets():
    _bundled_or_skip()
    from dps_fast.data import OOD, load_ood, load_split, pool_size

    mr = load_split("mr")
    assert pool_size("mr") == len(mr.train_texts) and pool_size("trec") == 5381 - 500
    sizes = {}
    for name in OOD:
        texts, labels = load_ood(name)
        sizes[name] = len(texts)
        assert set(labels) == {0, 1} and len(set(texts)) > 0.95 * len(texts)
        assert not set(texts) & set(mr.train_texts + mr.dev_texts)
        assert all("\r" not in t for t in texts)
        assert load_ood(name, 50) == (texts[:50], labels[:50])
    assert sizes == {"amazon": 3610, "tweets": 4196}  # non-zero ratings
    with pytest.raises(ValueError, match="size"):
        load_ood("amazon", 10 ** 6)
    with pytest.raises(ValueError, match="out-of-domain"):
        load_ood("yelp")


# ----- baselines on a tiny random BERT ----------------------------------------------

def tiny_bert(seed=0):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def batch(step):
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(1, 32, (8, 10), generator=generator)
    return ids, ids[:, 1] % 3


def loss_of(model, step):
    ids, labels = batch(step)
    return F.cross_entropy(model(input_ids=ids).logits, labels)


def managed(opt):
    return [p for g in opt.param_groups if g["dps"] for p in g["params"]]


def test_childtuning_masks_encoder_weights_only():
    model = tiny_bert()
    names = {id(p): n for n, p in model.named_parameters()}
    opt = ChildTuningAdamW(childtuning_groups(model), mode="F")
    assert sorted(names[id(p)] for p in managed(opt)) == sorted(
        n for n, p in model.named_parameters() if "encoder.layer" in n and n.endswith("weight")
        and "LayerNorm" not in n)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("mode", ["F", "D"])
def test_childtuning_is_adamw_on_masked_gradients(mode):
    """F: a fresh Bernoulli(q) mask per step and tensor, gradient * mask / q;
    D: one fixed mask, gradient * mask; both then a plain AdamW step."""
    model, reference = tiny_bert(), tiny_bert()
    q = 0.3
    opt = ChildTuningAdamW(childtuning_groups(model), mode=mode, keep_fraction=q, lr=1e-3)
    ref_opt = torch.optim.AdamW(childtuning_groups(reference), lr=1e-3)
    if mode == "D":
        masks = fisher_masks(managed(opt), [lambda s=s: loss_of(model, s) for s in range(3)], keep_fraction=q)
        opt.set_masks(masks)
    ref_managed = {id(r): p for p, r in zip(model.parameters(), reference.parameters()) if p in set(managed(opt))}
    seen = []
    for step in range(4):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            loss_of(m, step).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
        assert opt.phase == "exploit"
        for r in reference.parameters():
            p = ref_managed.get(id(r))
            if p is not None:
                mask = opt.mask(p)
                r.grad = r.grad * mask / (q if mode == "F" else 1.0)
        ref_opt.step()
        seen.append(torch.cat([opt.mask(p).reshape(-1) for p in managed(opt)]))
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)
    kept = [s.float().mean().item() for s in seen]
    assert all(abs(k - q) < 0.05 for k in kept)
    if mode == "F":
        assert not torch.equal(seen[0], seen[1])  # fresh every step
    else:
        assert all(torch.equal(seen[0], s) for s in seen)  # fixed


def test_fisher_masks_use_one_global_threshold():
    model = tiny_bert()
    params = [p for n, p in model.named_parameters() if "encoder.layer" in n and n.endswith("dense.weight")]
    masks = fisher_masks(params, [lambda s=s: loss_of(model, s) for s in range(4)], keep_fraction=0.3)
    total = sum(p.numel() for p in params)
    kept = sum(m.sum().item() for m in masks.values())
    assert kept >= math.ceil(0.3 * total) and kept < 0.3 * total + 5  # ties are rare
    per_tensor = [m.float().mean().item() for m in masks.values()]
    assert max(per_tensor) - min(per_tensor) > 0.05  # not a per-tensor top-q
    assert all(p.grad is None for p in params)


def test_mixout_is_dps_mix_exploration_forever():
    """MixoutAdamW == DPS-Mix within its first exploration stage, and it never exploits."""
    runs = []
    for make in (lambda groups: MixoutAdamW(groups, mix_prob=0.3, lr=1e-3),
                 lambda groups: DPSAdamW(groups, lr=1e-3, sparsity=0.3, stage_steps=100, variant="mix")):
        model = tiny_bert()
        opt = make(param_groups(model))
        opt.attach_mix(model)
        torch.manual_seed(7)
        for step in range(6):
            opt.zero_grad()
            loss_of(model, step).backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            assert opt.phase == "explore"
        runs.append(model)
    for a, b in zip(*(m.parameters() for m in runs)):
        torch.testing.assert_close(a, b)
    model = runs[0]
    ids, _ = batch(0)
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # mixing in training
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # raw weights in eval


@pytest.mark.parametrize("method", METHODS)
def test_build_optimizer_every_method_trains(method):
    model = tiny_bert()
    fisher = [lambda s=s: loss_of(model, s) for s in range(2)] if method == "childtuning-d" else None
    opt, clip = build_optimizer(method, model, total_steps=8, lr=1e-3, stage_ratio=0.25, fisher_batches=fisher)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(8):
        opt.zero_grad()
        loss_of(model, step).backward()
        clip(1.0)
        opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if method in ("dps", "dps-mix"):
        assert opt.param_groups[0]["stage_steps"] == 2 and opt.mask(model.classifier.weight) is not None


def test_dps_extension_point_keeps_the_published_schedule():
    model = tiny_bert()
    opt = DPSAdamW(param_groups(model), lr=1e-3, stage_steps=2)
    phases = []
    for step in range(6):
        phases.append(opt.phase)
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
    assert phases == ["explore", "explore", "exploit", "exploit", "explore", "explore"]


# ----- the runner on the bundled model ----------------------------------------------

@pytest.fixture(scope="module")
def trec_tiny():
    """A tiny random BERT with the bundled tokenizer's vocabulary (the runner's
    plumbing, fast); the bundled model itself runs in the CLI test below."""
    load_split = _bundled_or_skip()
    transformers = pytest.importorskip("transformers")
    from dps_fast.data import model_dir
    from dps_fast.finetune import Encoded

    split = load_split("trec", train_size=32, dev_size=64)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, num_labels=6,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return (transformers.BertForSequenceClassification(config),
            Encoded(tokenizer, split.train_texts, split.train_labels, 16),
            Encoded(tokenizer, split.dev_texts, split.dev_labels, 16))


@pytest.mark.parametrize("method", METHODS)
def test_train_run_every_method(trec_tiny, method):
    from dps_fast.finetune import Recipe, train_run

    base, train, dev = trec_tiny
    recipe = Recipe(steps=4, stage_ratio=0.5)
    result = train_run(base, train, dev, method, seed=0, recipe=recipe)
    assert result["steps"] == 4 and 0 <= result["dev_accuracy"] <= 1 and math.isfinite(result["train_loss"])
    if method in ("dps", "dps-mix"):
        assert result["stage_steps"] == 2
    if method == "dps":  # same seed, same run
        assert train_run(base, train, dev, method, seed=0, recipe=recipe) | dict(seconds=0, seconds_eval=0) == \
            result | dict(seconds=0, seconds_eval=0)


@pytest.mark.parametrize("state_dtype", ["bf16", "8bit"])
def test_train_run_in_every_state_format(trec_tiny, state_dtype):
    from dps_fast import state_format
    from dps_fast.finetune import Recipe, train_run
    from dps_fast.finetune.cli import STATE_DTYPES

    assert STATE_DTYPES == state_format.NAMES  # --state-dtype offers every format
    base, train, dev = trec_tiny
    result = train_run(base, train, dev, "dps", seed=0, recipe=Recipe(steps=4, stage_ratio=0.5, state_dtype=state_dtype))
    assert result["storage"] == f"fp32, nearest, {state_dtype} state" and math.isfinite(result["train_loss"])


@pytest.mark.parametrize("method", ["dps", "dps-mix", "mixout"])
def test_train_run_records_a_dev_curve_and_out_of_domain_accuracy(trec_tiny, method):
    from dps_fast.finetune import Recipe, evaluate, train_run

    base, train, dev = trec_tiny
    recipe = Recipe(steps=6, stage_ratio=0.5, lr=1e-3)
    plain = train_run(base, train, dev, method, seed=1, recipe=recipe)
    assert "curve" not in plain and "ood" not in plain
    assert plain["majority"] == max(dev.labels.count(c) for c in set(dev.labels)) / len(dev)
    assert plain["lr"] == recipe.lr and plain["epochs"] is None
    result = train_run(base, train, dev, method, seed=1, recipe=recipe, eval_every=2, ood={"again": dev})
    assert [step for step, _ in result["curve"]] == [2, 4, 6] and result["curve"][-1][1] == result["dev_accuracy"]
    # evaluating in between changes nothing (no random draw, no schedule step)
    assert (result["dev_accuracy"], result["train_loss"]) == (plain["dev_accuracy"], plain["train_loss"])
    assert result["ood"] == {"again": dict(accuracy=result["dev_accuracy"], majority=result["majority"])}
    assert 0 <= evaluate(base, dev, "cpu") <= 1


def test_batch_order_is_lazy_and_reshuffles_every_epoch():
    from dps_fast.finetune.recipe import _batch_order

    batches = list(_batch_order(10, 4, 7, seed=0))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    assert sorted(sum(batches[:3], [])) == list(range(10)) and batches[:3] != batches[3:6]
    assert next(iter(_batch_order(10, 4, 10 ** 15, seed=0))) == batches[0]  # no list of 10**15 batches
