"""What the tests share: a tiny BERT-shaped model and its training step, gradients
whose scores are exact, and the comparison of two optimizer states."""
import torch
import torch.nn.functional as F

from dps_fast.tiny import TinyEncoder


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyEncoder(vocab=16, dim=16, layers=1, heads=2, length=8)


def grid_grad(shape, generator, dtype=torch.float32):
    """A gradient on the 1/16 grid: its squares, and so scores and masks, are exact."""
    return (torch.randint(-63, 64, shape, generator=generator) / 16).to(dtype)


def assert_same_state(a, b):
    """Two optimizers' per-parameter states ({index: {key: value}}) equal, tensors to the bit."""
    assert a.keys() == b.keys()
    for index in a:
        assert a[index].keys() == b[index].keys(), f"parameter {index}: state keys"
        for key, value in a[index].items():
            same = torch.equal(value, b[index][key]) if isinstance(value, torch.Tensor) else value == b[index][key]
            assert same, f"parameter {index}: state {key!r}"


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
