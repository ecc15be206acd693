"""clip_grad_norm_'s masked norms as one Triton launch per gradient dtype: one
program per chunk reads the gradient and its mask bits once and writes the
chunk's sum of squares (fp64); the host adds the chunks of each tensor. No
masked copy.
"""
import torch
import triton
import triton.language as tl

from ... import param_state
from .. import reference
from .tables import CHUNK, TL_DTYPES, UNTUNED_CONFIG, address, addressable, chunk_of_program, launching_on, upload

# Columns of a row of the norms' table, after NUMEL and FIRST_CHUNK (Note [table layout]).
GRAD, MASK_BITS = tl.constexpr(2), tl.constexpr(3)
FIELDS = tl.constexpr(4)


@triton.jit
def _masked_norm_kernel(rows_ptr, owners_ptr, out_ptr, GRAD_DTYPE: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Per chunk: the sum of (g * mask bit)^2 over its entries (an inf masked out gives NaN,
    as grad * mask does), in fp64 lanes: each square is exact, as in the reference."""
    tensor, row, start, length = chunk_of_program(rows_ptr, owners_ptr, FIELDS, CHUNK)
    grad_ptr = address(row, GRAD, GRAD_DTYPE, start)
    bits_ptr = address(row, MASK_BITS, tl.uint8, start // 8)
    lanes = tl.zeros([BLOCK], dtype=tl.float64)
    for block in range(0, length, BLOCK):
        idx = block + tl.arange(0, BLOCK)
        live = idx < length
        grad = tl.load(grad_ptr + idx, mask=live, other=0.0).to(tl.float64)
        kept = (tl.load(bits_ptr + (idx >> 3), mask=live, other=0).to(tl.int32) >> (idx & 7)) & 1
        masked = grad * kept.to(tl.float64)
        lanes += masked * masked
    tl.store(out_ptr + tl.program_id(0), tl.sum(lanes, 0))


def masked_norms(grads, masks):
    """1-D float64 tensor: the L2 norm of each grad * its packed mask; semantics of
    reference.masked_norms (squares summed in fp64)."""
    param_state.check_masks(grads, masks, grads[0].device if grads else None)
    norms = [None] * len(grads)
    by_dtype = {}
    for i, grad in enumerate(grads):
        if grad.numel() == 0:
            norms[i] = torch.zeros((), dtype=torch.float64, device=grad.device)
        elif grad.dtype == torch.float64:  # as the update does: the reference, summed in its order
            norms[i] = reference.masked_norms([grad], [masks[i]])[0]
        else:
            by_dtype.setdefault(grad.dtype, []).append(i)
    block, num_warps = UNTUNED_CONFIG
    for dtype, indices in by_dtype.items():
        device = grads[indices[0]].device
        ready = addressable([grads[i] for i in indices])
        bits = addressable([masks[i] for i in indices])
        (rows, owners, _, _), n_chunks = upload(device, [[g.data_ptr(), b.data_ptr()] for g, b in zip(ready, bits)],
                                                [g.numel() for g in ready])
        partial = torch.empty(n_chunks, dtype=torch.float64, device=device)
        with launching_on(device):
            _masked_norm_kernel[(n_chunks,)](rows, owners, partial, GRAD_DTYPE=TL_DTYPES[dtype], CHUNK=CHUNK,
                                             BLOCK=block, num_warps=num_warps)
        sums = torch.zeros(len(indices), dtype=torch.float64, device=device).index_add_(0, owners, partial)
        for i, norm in zip(indices, reference.norms_from_squares(sums, dtype)):
            norms[i] = norm
    return torch.stack(norms)
