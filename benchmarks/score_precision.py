"""How far masks selected from bf16 scores are from masks selected from fp32
scores, on the real gradients of a DPS fine-tune.

    python benchmarks/score_precision.py [--task trec] [--train-size 500] [--seeds 0,1]

DPS-Dense fine-tunes the bundled MiniLM (fp32 model and state, the study's
recipe: 3 epochs, batch 16, lr 5e-5, T = int(0.05 * steps)). Beside its fp32
scores, a shadow score per managed tensor accumulates the same gradients as
state_dtype="bf16" stores them (fp32 sum, stored in bf16 with the score's
stochastic-rounding bits: dps_fast.rounding). At each exploitation stage the
shadow's mask (selected by the same rule, dps_fast.selection) is compared
with the mask DPSAdamW selected: per tensor, the fraction of the fp32 mask's
kept entries that the bf16 mask keeps too. Prints the min, median and mean
over tensors and stages, and per stage.
"""
import argparse
import statistics

import torch

from dps_fast import DPSAdamW, param_groups, rounding, selection
from dps_fast.data import load_split
from dps_fast.finetune.recipe import Encoded, Recipe, _batch_order, _init_head, load_model


def shadow_scores(opt, managed, shadow, step):
    """Accumulate this step's gradients into the bf16 shadow scores, as the bf16 format does."""
    group = opt.param_groups[0]
    start, stage_steps = group["schedule_start"], group["stage_steps"]
    first_of_stage = (step - start - 1) % stage_steps == 0
    for param in managed:
        grad = param.grad.float()
        total = grad * grad if first_of_stage or param not in shadow else shadow[param].float() + grad * grad
        seed = opt.state[param].get("round_seed", 1234)
        index = torch.arange(param.numel(), dtype=torch.int64).view(param.shape)
        bits = rounding.entry_words(rounding.stream_keys(seed, step)[1], index) & 0xFFFF
        shadow[param] = rounding.stochastic(total, torch.bfloat16, bits)


def run(task, train_size, seed):
    recipe = Recipe()
    split = load_split(task, train_size)
    tokenizer, base = load_model(len(split.label_names), recipe.dropout)
    torch.manual_seed(seed)
    model = base
    _init_head(model)
    model.train()
    train = Encoded(tokenizer, split.train_texts, split.train_labels, 48 if task == "trec" else 64)
    steps = recipe.total_steps(len(train))
    opt = DPSAdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, sparsity=recipe.sparsity,
                   total_steps=steps, stage_ratio=recipe.stage_ratio, backend="torch")
    managed = opt.param_groups[0]["params"]
    shadow, overlaps = {}, {}
    for step, indices in enumerate(_batch_order(len(train), recipe.batch_size, steps, seed), 1):
        loss = model(**train.batch(indices, "cpu")).loss
        opt.zero_grad()
        loss.backward()
        exploring = opt.phase == "explore"
        if exploring:
            shadow_scores(opt, managed, shadow, step)
        opt.clip_grad_norm_(recipe.max_grad_norm)
        opt.step()
        stage = opt.param_groups[0]["stage_steps"]
        if not exploring and (step - 1) % stage == 0:  # the first step of an exploitation stage: masks made
            for index, param in enumerate(managed):
                mine = opt.mask(param)
                theirs = selection.select_mask(shadow[param], recipe.sparsity)
                overlaps.setdefault(step, []).append((mine & theirs).sum().item() / mine.sum().item())
    return steps, opt.param_groups[0]["stage_steps"], overlaps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="trec", choices=("trec", "mr"))
    parser.add_argument("--train-size", type=int, default=500)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    everything = []
    for seed in (int(s) for s in args.seeds.split(",")):
        steps, stage_steps, overlaps = run(args.task, args.train_size, seed)
        print(f"{args.task}, {args.train_size} examples, seed {seed}: {steps} steps, T = {stage_steps}, "
              f"{len(overlaps[next(iter(overlaps))])} managed tensors")
        for step, values in overlaps.items():
            print(f"  exploitation stage from step {step}: kept in common min {100 * min(values):.2f}%, "
                  f"median {100 * statistics.median(values):.2f}%")
            everything += values
    print(f"all stages and tensors ({len(everything)}): min {100 * min(everything):.2f}%, median "
          f"{100 * statistics.median(everything):.2f}%, mean {100 * statistics.fmean(everything):.2f}%")


if __name__ == "__main__":
    main()
