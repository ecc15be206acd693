"""A short synthetic fine-tune: AdamW vs DPS-Dense vs DPS-Mix on a tiny
BERT-like encoder (random weights, synthetic task, CPU in seconds)."""
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .groups import param_groups
from .optimizer import DPSAdamW


class Block(nn.Module):
    """One post-LN BERT layer: attention (q, k, v, o) and a GELU feed-forward."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.attn_out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.intermediate, self.output = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        split = lambda t: t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        attn = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        x = self.norm1(x + self.attn_out(attn.transpose(1, 2).reshape(batch, length, dim)))
        return self.norm2(x + self.output(F.gelu(self.intermediate(x))))


class TinyEncoder(nn.Module):
    """Embeddings, `layers` BERT blocks, a tanh pooler and a classifier."""

    def __init__(self, vocab=32, dim=32, layers=2, heads=4, classes=2, length=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.pooler, self.classifier = nn.Linear(dim, dim), nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def synthetic_task(count, vocab=32, length=16, seed=0):
    """Token sequences labelled by whether the first token occurs again later."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (count, length), generator=generator)
    labels = (tokens[:, 1:] == tokens[:, :1]).any(dim=1).long()
    return tokens, labels


def train(method, steps, seed=0, batch=32, lr=1e-3):
    """Train TinyEncoder with `method` ("adamw", "dps", "dps-mix"); returns
    (final train loss, dev accuracy, seconds)."""
    torch.manual_seed(seed)
    model = TinyEncoder()
    tokens, labels = synthetic_task(4096, seed=1)
    dev_tokens, dev_labels = synthetic_task(1024, seed=2)
    groups = param_groups(model, weight_decay=0.01)
    if method == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr)
    else:
        variant = "mix" if method == "dps-mix" else "dense"
        optimizer = DPSAdamW(groups, lr=lr, total_steps=steps, variant=variant)
        if variant == "mix":
            optimizer.attach_mix(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, (steps - s) / steps))
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(tokens), (batch,))
        loss = F.cross_entropy(model(tokens[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        if isinstance(optimizer, DPSAdamW):
            optimizer.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(dev_tokens).argmax(dim=1) == dev_labels).float().mean().item()
    return loss.item(), accuracy, seconds


def add_arguments(parser):
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per method (default 1)")


def run(args):
    print(f"synthetic task, tiny BERT-like encoder, {args.steps} steps, batch 32, lr 1e-3, DPS defaults "
          f"(sparsity 0.3, T = int(0.05 * steps) = {int(0.05 * args.steps)})")
    print(f"{'method':<8} {'dev acc (mean ± std)':>22} {'final loss':>11} {'s/run':>7}")
    for method in ("adamw", "dps", "dps-mix"):
        results = [train(method, args.steps, seed=seed) for seed in range(args.seeds)]
        accuracies = torch.tensor([r[1] for r in results])
        std = accuracies.std().item() if len(results) > 1 else math.nan
        print(f"{method:<8} {accuracies.mean().item():>14.4f} ± {std:<6.4f} {results[-1][0]:>11.4f} "
              f"{sum(r[2] for r in results) / len(results):>7.1f}")
    return 0
