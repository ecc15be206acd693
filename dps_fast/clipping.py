"""DPSAdamW.clip_grad_norm_: the published order, mask then clip, from inside step().

The published code masks gradients in autograd, so its clip sees the masked
gradients of exploitation stages. DPSAdamW masks inside step(); so
clip_grad_norm_ computes the norm of what the next step will apply (each
gradient times its mask, if it has one) and leaves a pending clip factor that
step() applies, after scoring: p.grad is left as it is, so exploration
scores see the unclipped gradient, as in the published code. A gradient
changed in between cancels the clip (with a warning).
"""
import warnings

import torch

from . import distributed, param_state


def clip_factor(entries, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """(total norm, clip factor min(1, max_norm / (norm + 1e-6)), both 0-dim) of the
    gradients `entries` = [(param, packed mask or None, backend)] as masked; the
    L2 norms of masked gradients come from their backend (one pass over each
    gradient and its mask bits), the others from torch. Dtypes follow
    torch.nn.utils.clip_grad_norm_: each norm in its gradient's dtype, so that bf16
    gradients give a bf16 total norm and factor in either phase."""
    grads, masked = [], {}
    for param, bits, backend in entries:
        if bits is None:
            grads.append(param.grad)
        elif float(norm_type) == 2.0 and not distributed.is_dtensor(param):
            masked.setdefault((backend, param.device, param.grad.dtype), []).append((param.grad, bits))
        else:
            grads.append(param.grad * param_state.bool_mask(param, bits))
    for (backend, _, dtype), pairs in masked.items():  # the 2-norm of per-tensor 2-norms is the total 2-norm
        # one 0-dim norm per tensor, as torch's own per-gradient norms: stacked and promoted with them
        grads.extend(backend.masked_norms(*zip(*pairs)).to(dtype).unbind())
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
    if distributed.is_dtensor(total_norm):  # sharded gradients: the norm over all shards
        total_norm = total_norm.full_tensor()
    return total_norm, (float(max_norm) / (total_norm + 1e-6)).clamp(max=1.0)


class Pending:
    """A clip factor waiting for the next step(), with the gradients it was computed from."""

    def __init__(self, factor, grads):
        self.factor = factor
        self._seen = [(grad, grad._version) for grad in grads]

    def factor_for(self, grads):
        """The factor if `grads` (the gradients step() is about to apply) are the
        same tensors, unchanged since; else None, with a warning."""
        if len(grads) == len(self._seen) and all(
                grad is seen and grad._version == version for grad, (seen, version) in zip(grads, self._seen)):
            return self.factor
        warnings.warn("gradients changed after clip_grad_norm_; that clip is not applied. "
                      "Call clip_grad_norm_ right before step().", stacklevel=4)
        return None
