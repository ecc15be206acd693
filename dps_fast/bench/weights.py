"""What the bench's rows work on: a BERT-large-shaped weight set for the
optimizer-step and boundary rows, and a BERT-shaped encoder config for the
whole-training-step rows.

Weight set: 24 layers of query, key, value, attention-output (1024x1024 +
bias), intermediate (4096x1024 + bias), output (1024x4096 + bias) and two
LayerNorms (302.3M parameters), scaled by `scale` (a fraction of that count):
whole layers of width 1024 down to one layer, then one narrower layer.
Linear weights are managed by DPS (as in dps_fast.param_groups); biases and
LayerNorm are plain AdamW.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..groups import param_groups
from ..tiny import Block

BERT_LARGE_LAYERS, BERT_LARGE_DIM = 24, 1024
# Default weight-set scale per device type: about a minute of benchmarking.
DEFAULT_SCALE = {"cpu": 1 / 24, "cuda": 1.0}


def layer_params(dim):
    """Parameters of one BERT layer of width `dim` (FFN 4 * dim)."""
    return 12 * dim * dim + 13 * dim  # 4 dim^2 + 8 dim^2 weights; 9 dim biases; 2 LayerNorms


BERT_LARGE_PARAMS = BERT_LARGE_LAYERS * layer_params(BERT_LARGE_DIM)


def weight_shape(scale):
    """(layers, width) of the weight set holding about scale x BERT-large's encoder."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0; got {scale!r}")
    target = scale * BERT_LARGE_PARAMS
    if target >= layer_params(BERT_LARGE_DIM):
        return round(target / layer_params(BERT_LARGE_DIM)), BERT_LARGE_DIM
    dim = max(32, round(math.sqrt(target / 12) / 32) * 32)
    return 1, dim


def weight_set_params(scale):
    """Parameters of the weight set of `scale`."""
    layers, dim = weight_shape(scale)
    return layers * layer_params(dim)


def scale_for_params(count):
    """The scale whose weight set holds about `count` parameters."""
    return count / BERT_LARGE_PARAMS


def weight_set(scale, device, seed=0, dtype=torch.float32):
    """The weight set (an nn.ModuleList of BERT layers) with fixed random
    weights and gradients of `dtype` on `device`."""
    layers, dim = weight_shape(scale)
    with torch.device("meta"):
        model = nn.ModuleList(Block(dim, 1) for _ in range(layers)).to(dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.05, 0.05, generator=generator)
            param.grad = torch.empty_like(param).normal_(0, 1e-3, generator=generator)
    return model


def parameter_counts(model):
    """(managed, plain) parameter counts as dps_fast.param_groups splits them."""
    managed = plain = 0
    for group in param_groups(model):
        count = sum(p.numel() for p in group["params"])
        if group.get("dps", True):
            managed += count
        else:
            plain += count
    return managed, plain


@dataclass(frozen=True)
class TrainConfig:
    """A BERT-shaped encoder for the whole-training-step rows."""
    layers: int
    dim: int
    heads: int
    vocab: int
    batch: int
    seq: int

    def describe(self):
        return (f"{self.layers} layers, width {self.dim}, {self.heads} heads, vocab {self.vocab}, "
                f"batch {self.batch} x seq {self.seq}")


# CPU: small enough for a 2-core machine (vocab cut so that embeddings are
# ~8% of the parameters, as in BERT-large); CUDA: BERT-large, batch 16 x 128
# as in the paper's recipe (fp32).
TRAIN_CPU = TrainConfig(layers=4, dim=256, heads=4, vocab=1024, batch=8, seq=64)
TRAIN_CUDA = TrainConfig(layers=24, dim=1024, heads=16, vocab=30522, batch=16, seq=128)


def default_train_config(device):
    return TRAIN_CUDA if torch.device(device).type == "cuda" else TRAIN_CPU


class Workload:
    """The tensors and models the cases of one device share, built on first use."""

    def __init__(self, device, scale, train_config=None, seed=0, dtype=torch.float32, rounding="nearest"):
        self.device = torch.device(device)
        self.scale = scale
        self.train_config = train_config or default_train_config(self.device)
        self.seed = seed
        self.dtype = dtype  # of the parameters and gradients of every row
        self.rounding = rounding  # DPSAdamW's rounding of bf16/fp16 parameters
        self._weights = None

    def weights(self, dtype=None):
        """The weight set in the workload's dtype (kept), or in another `dtype` (a new copy)."""
        if dtype is not None and dtype != self.dtype:
            return weight_set(self.scale, self.device, self.seed, dtype)
        if self._weights is None:
            self._weights = weight_set(self.scale, self.device, self.seed, self.dtype)
        return self._weights

    def release(self):
        self._weights = None
