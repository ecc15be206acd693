"""The paper's choice of managed tensors, as param groups for DPSAdamW."""
from torch import nn


def _is_norm(module):
    # torch's norm layers, and the many custom ones (T5LayerNorm, LlamaRMSNorm, ...)
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)) \
        or "norm" in type(module).__name__.lower()


def param_groups(model, weight_decay=0.01):
    """Param groups for DPSAdamW: the weight of every nn.Linear is managed by DPS
    (with decay); biases and normalisation parameters are plain AdamW without
    decay; everything else (embeddings, ...) is plain AdamW with decay.
    Frozen parameters (requires_grad=False) are left out; empty groups too."""
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    no_decay = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    managed, decayed, undecayed = [], [], []
    for name, param in model.named_parameters():  # shared tensors are listed once
        if not param.requires_grad:
            continue
        if id(param) in linear_weights:
            managed.append(param)
        elif id(param) in no_decay or name.rsplit(".", 1)[-1] == "bias":
            undecayed.append(param)
        else:
            decayed.append(param)
    groups = [
        {"params": managed, "weight_decay": weight_decay},
        {"params": decayed, "weight_decay": weight_decay, "dps": False},
        {"params": undecayed, "weight_decay": 0.0, "dps": False},
    ]
    return [g for g in groups if g["params"]]
