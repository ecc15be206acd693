"""A tiny BERT-shaped encoder and a synthetic task: the model of the tests and
of `dps-fast bench`'s training rows (its nn.Linear layers are what
dps_fast.param_groups manages in BERT)."""
import torch
import torch.nn.functional as F
from torch import nn


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
