"""Pure-PyTorch backend: the executable specification of one DPS update.

Short and obvious on purpose; every fast backend is tested against it.
All arithmetic is in the state's dtype (dps_fast.param_state.state_dtype): fp32
whatever the parameter dtype, float64 for float64 parameters.
"""
import torch

from .. import selection

NAME = "torch"


def unavailable_reason(device: torch.device):
    """None: plain PyTorch runs on every device."""
    return None


def adamw_math(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step out of place, op for op as torch.optim.AdamW (so that the
    two agree to the bit). Returns the new (param, exp_avg, exp_avg_sq)."""
    param = param * (1 - lr * weight_decay)
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    return param.addcdiv_(exp_avg, denom, value=-step_size), exp_avg, exp_avg_sq


def update(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
           grad_coef=None, scores=None, reset_scores=None, masks=None, freeze=False,
           inv_scale=None, found_inf=None):
    """Update every tensor of one group in place.

    lr: a float, or a 0-dim tensor (rounded as torch.optim.AdamW rounds a tensor lr).

    steps: the bias-correction step of each tensor, already advanced.
    grad_coef: optional 0-dim tensor (a pending gradient-clip factor) applied to
        the gradient the update uses, not to the one that is scored.
    scores / reset_scores: explore steps: score := g*g where reset, else += g*g.
    masks: exploit steps: packed masks (dps_fast.selection); freeze=False zeroes the masked-out
        gradient (published "grad" semantics), freeze=True leaves masked-out
        entries and their moments untouched.
    inv_scale / found_inf: optional 0-dim fp32 tensors from a GradScaler: the
        gradient is multiplied by inv_scale before anything else (scoring
        included), and nothing at all is written when found_inf is nonzero.
    """
    if found_inf is not None and found_inf.item() != 0:
        return
    for i, param in enumerate(params):
        compute = exp_avgs[i].dtype
        grad = grads[i].to(compute)
        if inv_scale is not None:
            grad = grad * inv_scale
        if scores is not None:
            if reset_scores[i]:
                scores[i].copy_(grad * grad)
            else:
                scores[i].addcmul_(grad, grad)
        if grad_coef is not None:  # in the compute dtype: a float64 clip factor must not promote a 0-dim grad
            grad = grad * grad_coef.to(compute)
        mask = None if masks is None else selection.unpack_mask(masks[i], param.shape)
        if mask is not None and not freeze:
            grad = grad * mask
        new_param, new_avg, new_avg_sq = adamw_math(
            param.to(compute), grad, exp_avgs[i], exp_avg_sqs[i], steps[i], lr, beta1, beta2, eps, weight_decay)
        if mask is not None and freeze:
            new_param = torch.where(mask, new_param, param.to(compute))
            new_avg = torch.where(mask, new_avg, exp_avgs[i])
            new_avg_sq = torch.where(mask, new_avg_sq, exp_avg_sqs[i])
        param.copy_(new_param)
        exp_avgs[i].copy_(new_avg)
        exp_avg_sqs[i].copy_(new_avg_sq)


def update_some(indices, params, grads, exp_avgs, exp_avg_sqs, steps, *, scores=None, reset_scores=None,
                masks=None, **hyper):
    """update() of the tensors at `indices` of the lists: the fast backends' fallback
    for the tensors their kernels do not take (float64, non-contiguous, ...)."""
    def pick(values):
        return None if values is None else [values[i] for i in indices]

    update(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(steps), scores=pick(scores),
           reset_scores=pick(reset_scores), masks=pick(masks), **hyper)


def masked_norms(grads, masks):
    """1-D float64 tensor: the L2 norm of each grad * its (packed) mask, the squares
    summed in float64 (each one exact for gradients up to fp32) and the root rounded to
    the gradient's dtype, as torch.nn.utils.clip_grad_norm_'s norm of that gradient is
    (float64 holds each value exactly). Every backend gives these values to the bit
    (an inf masked out gives NaN)."""
    return torch.stack([_rounded(torch.linalg.vector_norm(grad * selection.unpack_mask(bits, grad.shape),
                                                          dtype=torch.float64), grad.dtype)
                        for grad, bits in zip(grads, masks)])


def norms_from_squares(squared_sums, dtype):
    """masked_norms' values from float64 sums of squares of gradients of `dtype`."""
    return _rounded(squared_sums.sqrt(), dtype)


def _rounded(norms, dtype):
    return norms.to(dtype).double()


def select_masks(scores, sparsity):
    """One packed mask per score tensor (see dps_fast.selection)."""
    return [selection.pack_mask(selection.select_mask(score, sparsity)) for score in scores]
