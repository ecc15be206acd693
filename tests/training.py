"""A tiny BERT-shaped model and its training step, shared by the optimizer's tests."""
import torch
import torch.nn.functional as F

from dps_fast.tiny import TinyEncoder


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyEncoder(vocab=16, dim=16, layers=1, heads=2, length=8)


def batch(step, size=8):
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, 16, (size, 8), generator=generator)
    return tokens, (tokens[:, 0] > 7).long()


def train_step(model, opt, step, clip=None):
    tokens, labels = batch(step)
    loss = F.cross_entropy(model(tokens), labels)
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        opt.clip_grad_norm_(clip)
    opt.step()
    return loss
