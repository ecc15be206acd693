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

A parametrized tensor (torch.nn.utils.parametrize: weight_norm, spectral_norm,
orthogonal, ...; and the older hook-based torch.nn.utils.weight_norm and
spectral_norm) is computed from originals, which are the parameters; they
take the rule of the tensor they make. Of a linear map's weight, DPS manages
the original with the most entries (the last of them on a tie: the weight
itself for spectral_norm and orthogonal, the direction v for weight_norm);
the others (weight_norm's magnitude g) are plain AdamW with decay, and named
in the warning when they have two or more dimensions.
"""
import warnings

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

# The hook-based reparametrizations: the parameters each keeps in place of tensor `name`.
_HOOK_ORIGINALS = {WeightNorm: ("_g", "_v"), SpectralNorm: ("_orig",)}


def _is_norm(module):
    # torch's norm layers, and the many custom ones (T5LayerNorm, LlamaRMSNorm, ...)
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)) \
        or "norm" in type(module).__name__.lower()


def _made_tensors(module):
    """The names of `module`'s tensors that are computed from originals (parametrized)."""
    hooked = [hook.name for hook in module._forward_pre_hooks.values() if type(hook) in _HOOK_ORIGINALS]
    return list(getattr(module, "parametrizations", {}).keys()) + hooked


def _originals(module, name):
    """The parameters behind `module.<name>`: the originals it is computed from if it is
    parametrized (without computing it), else the tensor itself ([] if None)."""
    if parametrize.is_parametrized(module, name):
        return list(module.parametrizations[name].parameters(recurse=False))
    for hook in module._forward_pre_hooks.values():
        if type(hook) in _HOOK_ORIGINALS and hook.name == name:
            return [getattr(module, name + suffix) for suffix in _HOOK_ORIGINALS[type(hook)]]
    tensor = getattr(module, name)
    return [] if tensor is None else [tensor]


def _own_parameters(module):
    """The parameters `module` holds directly, the originals of its parametrized tensors included."""
    originals = [p for plist in getattr(module, "parametrizations", {}).values() for p in plist.parameters(recurse=False)]
    return list(module.parameters(recurse=False)) + originals


def _made_names(model):
    """{id(original): the name of the tensor it makes}, for every parametrized tensor of `model`."""
    made = {}
    for prefix, module in model.named_modules():
        for name in _made_tensors(module):
            for original in _originals(module, name):
                made[id(original)] = f"{prefix}.{name}" if prefix else name
    return made


def _linear_weights(module):
    """The managed tensors of the linear maps `module` holds directly: each weight, or the
    largest original of a parametrized one."""
    if isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf")):
        names = ["weight"]  # Conv1D: transformers.pytorch_utils.Conv1D
    elif isinstance(module, nn.MultiheadAttention):  # its out_proj is an nn.Linear, met on its own
        names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
    else:
        return []
    weights = []
    for originals in filter(None, (_originals(module, name) for name in names)):
        largest = max(p.numel() for p in originals)
        weights.append([p for p in originals if p.numel() == largest][-1])
    return weights


def param_groups(model, weight_decay=0.01):
    """Param groups for DPSAdamW, by the rule of this module's docstring: the
    managed linear weights (with decay), plain AdamW with decay, plain AdamW
    without decay (biases, normalisation)."""
    embeddings = {id(w) for m in model.modules() if isinstance(m, nn.Embedding) for w in _originals(m, "weight")}
    linear = {id(w) for m in model.modules() for w in _linear_weights(m)} - embeddings
    no_decay = {id(p) for m in model.modules() if _is_norm(m) for p in _own_parameters(m)}
    no_decay |= {id(t) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
                 for name in ("bias_k", "bias_v") for t in _originals(m, name)}
    made_names = _made_names(model)
    managed, decayed, undecayed, unmanaged = [], [], [], []
    for name, param in model.named_parameters():  # shared tensors are listed once
        if not param.requires_grad:
            continue
        made = made_names.get(id(param), name)
        if id(param) in linear:
            managed.append(param)
        elif id(param) in no_decay or made.endswith("bias"):
            undecayed.append(param)
        else:
            decayed.append(param)
            if param.dim() >= 2 and made.endswith("weight") and id(param) not in embeddings:
                unmanaged.append(name)
    if unmanaged:
        warnings.warn(f"param_groups: {len(unmanaged)} weight(s) of 2 or more dimensions are not the weight of a "
                      f"linear layer DPS knows (nn.Linear, Conv1D, nn.MultiheadAttention), nor the largest original "
                      f"of a parametrized one, and stay plain AdamW: "
                      f"{', '.join(unmanaged[:10])}{' ...' if len(unmanaged) > 10 else ''}. To manage them, "
                      "put them in a group of their own (DPSAdamW manages every group without \"dps\": False).",
                      stacklevel=2)
    groups = [
        {"params": managed, "weight_decay": weight_decay},
        {"params": decayed, "weight_decay": weight_decay, "dps": False},
        {"params": undecayed, "weight_decay": 0.0, "dps": False},
    ]
    return [g for g in groups if g["params"]]
