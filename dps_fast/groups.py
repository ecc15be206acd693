"""The paper's choice of managed tensors, as param groups for DPSAdamW.

The rule, by module:
  - managed by DPS (with weight decay): the weight of every linear map:
    nn.Linear (and subclasses, e.g. nn.MultiheadAttention's out_proj),
    Hugging Face's Conv1D (GPT-2's linear layers, stored transposed), and
    nn.MultiheadAttention's input projections (the packed in_proj_weight, or
    q/k/v_proj_weight);
  - plain AdamW without decay: biases (any parameter named *bias, and
    MultiheadAttention's bias_k/bias_v) and normalisation parameters;
  - plain AdamW with decay: everything else (embeddings, ...).
A tensor shared by several modules (tied weights) is listed once; a weight
shared by an nn.Embedding and a linear map (GPT-2's wte and lm_head, BERT's
word embeddings and decoder) is an embedding, never masked, as in the paper.
Frozen parameters (requires_grad=False) are left out, and so are empty groups.
Any other weight (a parameter named *weight) of two or more dimensions, e.g. a
custom layer's or a convolution's, is left to plain AdamW with a warning that
names it.
"""
import warnings

from torch import nn


def _is_norm(module):
    # torch's norm layers, and the many custom ones (T5LayerNorm, LlamaRMSNorm, ...)
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)) \
        or "norm" in type(module).__name__.lower()


def _linear_weights(module):
    """The weights of the linear maps `module` holds directly."""
    if isinstance(module, nn.Linear):
        return [module.weight]
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return [module.weight]
    if isinstance(module, nn.MultiheadAttention):  # its out_proj is an nn.Linear, met on its own
        return [w for w in (module.in_proj_weight, module.q_proj_weight, module.k_proj_weight,
                            module.v_proj_weight) if w is not None]
    return []


def param_groups(model, weight_decay=0.01):
    """Param groups for DPSAdamW, by the rule of this module's docstring: the
    managed linear weights (with decay), plain AdamW with decay, plain AdamW
    without decay (biases, normalisation)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear = {id(w) for m in model.modules() for w in _linear_weights(m)} - embeddings
    no_decay = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    no_decay |= {id(t) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
                 for t in (m.bias_k, m.bias_v) if t is not None}
    managed, decayed, undecayed, unmanaged = [], [], [], []
    for name, param in model.named_parameters():  # shared tensors are listed once
        if not param.requires_grad:
            continue
        if id(param) in linear:
            managed.append(param)
        elif id(param) in no_decay or name.endswith("bias"):
            undecayed.append(param)
        else:
            decayed.append(param)
            if param.dim() >= 2 and name.endswith("weight") and id(param) not in embeddings:
                unmanaged.append(name)
    if unmanaged:
        warnings.warn(f"param_groups: {len(unmanaged)} weight(s) of 2 or more dimensions are not in a linear "
                      f"layer DPS knows (nn.Linear, Conv1D, nn.MultiheadAttention) and stay plain AdamW: "
                      f"{', '.join(unmanaged[:10])}{' ...' if len(unmanaged) > 10 else ''}. To manage them, "
                      "put them in a group of their own (DPSAdamW manages every group without \"dps\": False).",
                      stacklevel=2)
    groups = [
        {"params": managed, "weight_decay": weight_decay},
        {"params": decayed, "weight_decay": weight_decay, "dps": False},
        {"params": undecayed, "weight_decay": 0.0, "dps": False},
    ]
    return [g for g in groups if g["params"]]
