"""DPSAdamW across processes: DDP, FSDP2 / DTensor parameters, checkpoints.

DDP needs nothing from here: gradients are all-reduced before step(), so every
rank scores the same gradients and selects the same masks.

With DTensor parameters (FSDP2's fully_shard, tensor parallelism, or any
sharded DTensor) each rank holds a shard of every tensor, and so of its
optimizer state. The update is element-wise, so each rank updates its local
shard (the backends get the local tensors). The one thing that needs the
whole tensor is the selection: the threshold of a tensor is the k-th largest
score over all its shards. It is computed exactly, without gathering the
scores, by a radix selection over the scores' order keys (the 32-bit keys
of dps_fast.selection; the steps are named in csrc/dps_select.h): PASSES
passes over digits of DIGIT_BITS bits, each a histogram of BINS counts per
tensor, all-reduced (all the tensors of a param group in one all-reduce),
then a narrow. Each rank then keeps key >= the k-th largest key on its
shard (ties kept), as dps_fast.selection does on a whole tensor. So every
rank must step the same parameters (a gradient on each, or on none), as FSDP2
does anyway.

The packed mask of a sharded parameter covers its local shard only. It is a
cache of the selection: it is left out of state_dict() (a per-shard tensor
cannot be saved as one tensor of a sharded or a full checkpoint) and selected
again, exactly, from the saved scores at the first exploitation step after
load_state_dict().
"""
import sys

import torch
import torch.distributed as dist

from . import selection

DIGIT_BITS, BINS, PASSES = selection.DIGIT_BITS, selection.BINS, selection.PASSES  # the digit plan
MASK_KEYS = ("mask", "mask_stage")


def is_dtensor(tensor):
    """True for a torch.distributed.tensor.DTensor."""
    # A DTensor exists only once torch.distributed.tensor is imported; looking the
    # module up keeps `import dps_fast` from importing it (over a second).
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor):
    """The local shard of a DTensor (sharing its storage), else the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_all(tensors):
    """[local(t) for t in tensors], checked once for the list (the common case: no DTensor)."""
    return [local(t) for t in tensors] if any(map(is_dtensor, tensors)) else list(tensors)


def check_group(group):
    """Raise ValueError if param group `group` (with the defaults filled in) asks
    for something DTensor parameters do not support."""
    dtensors = [p for p in group["params"] if is_dtensor(p)]
    if not dtensors:
        return
    if group["dps"] and group["variant"] == "mix":
        # the mixing wraps the module's forward, which under FSDP2 sees the unsharded
        # parameter, not the optimizer's DTensor
        raise ValueError("variant='mix' does not support DTensor (FSDP2) parameters; "
                         "use variant='dense', or DDP")
    from . import state_format as formats

    format = formats.of(group["state_dtype"])
    if format.quantized:
        # a shard's block scales would cover the blocks of its local entries: a per-rank
        # tensor that neither a sharded nor a full checkpoint can hold as one tensor yet
        raise ValueError(f"state_dtype={format.name!r} does not support DTensor (FSDP2) parameters yet; "
                         "use state_dtype='bf16' (or 'fp32'), or DDP")
    for param in dtensors:
        if formats.needs_random_bits(format, group["rounding"], param):
            global_offset(param)  # raises for a shard that is not a block of rows


def global_offset(dtensor):
    """The index in the whole tensor (row-major) of the first entry of this rank's
    shard: the base of its entries' stochastic-rounding indices (dps_fast.rounding).
    The shard must be a block of whole rows (sharded on dim 0 only)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(p.is_shard() and p.dim != 0 for p in dtensor.placements):
        raise ValueError(f"stochastic rounding needs each shard to be a block of rows (Shard(0)); this DTensor "
                         f"is placed {dtensor.placements}")
    _, offset = compute_local_shape_and_global_offset(dtensor.shape, dtensor.device_mesh, dtensor.placements)
    row = 1
    for size in dtensor.shape[1:]:
        row *= size
    return int(offset[0]) * row if offset else 0


def shard_groups(dtensor):
    """The process groups of the mesh dimensions `dtensor` is sharded over: summing
    over them counts every entry of the tensor once."""
    groups = []
    for dim, placement in enumerate(dtensor.placements):
        if placement.is_shard():
            groups.append(dtensor.device_mesh.get_group(dim))
        elif not placement.is_replicate():
            raise ValueError(f"DPSAdamW cannot select from a {placement} DTensor score "
                             "(only Shard and Replicate placements)")
    return tuple(groups)


def kth_largest_keys(scores, ks, groups=()):
    """The order key (dps_fast.selection.order_keys) of the ks[i]-th largest entry
    of tensor i, whose entries are split over the ranks of `groups` (`scores`
    holds this rank's part of each; 1 <= ks[i] <= the tensor's size over all
    ranks). Exact: equal to dps_fast.selection.threshold_key of the whole tensor.

    scores: float tensors on one device. Returns a 1-D int64 tensor of keys.
    Every rank of `groups` must call this with the same number of tensors and
    the same ks: PASSES all-reduces of len(scores) * BINS int64 counts per group.
    """
    device = scores[0].device
    candidates = [selection.order_keys(score.detach()).reshape(-1) for score in scores]
    rank = torch.tensor(ks, dtype=torch.int64, device=device)  # of the wanted key among the candidates
    prefix = torch.zeros(len(scores), dtype=torch.int64, device=device)
    zeros = torch.zeros(len(scores), 1, dtype=torch.int64, device=device)
    for shift in range(selection.KEY_BITS - DIGIT_BITS, -1, -DIGIT_BITS):
        # histogram: the candidates' digits, counted over every shard
        digits = [(candidate >> shift) & (BINS - 1) for candidate in candidates]
        histogram = torch.stack([torch.bincount(d, minlength=BINS) for d in digits])
        for group in groups:
            dist.all_reduce(histogram, group=group)
        # narrow: at_or_above[:, b] counts the candidates whose digit is >= b (column BINS: none)
        at_or_above = torch.cat([histogram.flip(1).cumsum(1).flip(1), zeros], dim=1)
        digit = (at_or_above[:, :BINS] >= rank[:, None]).sum(dim=1) - 1  # the wanted key's digit
        rank -= at_or_above.gather(1, (digit + 1)[:, None]).squeeze(1)
        prefix |= digit << shift
        if shift:
            candidates = [c[d == value] for c, d, value in zip(candidates, digits, digit.tolist())]
    return prefix


def select_masks(scores, sparsity):
    """Packed masks (dps_fast.selection format) of the local shards of DTensor
    `scores`, selected per whole tensor: each tensor keeps its
    ceil(N * (1 - sparsity)) top-scored entries over all shards, ties kept.
    Collective: every rank of the scores' meshes must call it with the same tensors."""
    masks = [None] * len(scores)
    batches = {}  # one batch of all-reduces per set of process groups (in the order met)
    for index, score in enumerate(scores):
        if score.numel() == 0:
            masks[index] = selection.pack_mask(torch.ones_like(local(score), dtype=torch.bool))
        else:
            batches.setdefault(shard_groups(score), []).append(index)
    for groups, indices in batches.items():
        shards = [local(scores[i]) for i in indices]
        ks = [selection.kept_count(scores[i].numel(), sparsity) for i in indices]
        for index, shard, key in zip(indices, shards, kth_largest_keys(shards, ks, groups)):
            masks[index] = selection.pack_mask(selection.order_keys(shard) >= key)
    return masks


def unpacked_mask(param, bits):
    """The bool mask of DTensor `param` as a DTensor with the parameter's placements,
    from the packed mask of its local shard."""
    from torch.distributed.tensor import DTensor
    shard = selection.unpack_mask(bits, param.to_local().shape)
    return DTensor.from_local(shard, param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride())


def state_to_save(param, state):
    """`state` of `param` as state_dict() saves it: without the per-shard mask of a
    DTensor parameter (selected again after loading)."""
    if not is_dtensor(param):
        return state
    return {key: value for key, value in state.items() if key not in MASK_KEYS}


def loaded_state(param, state):
    """`state` of DTensor `param` from load_state_dict(): per-shard masks dropped
    (they are selected again from the scores), full tensors (an unsharded state
    dict, e.g. from a single-process run) cut to this rank's shard."""
    from torch.distributed.tensor import distribute_tensor
    loaded = {}
    for key, value in state.items():
        if key in MASK_KEYS:
            continue
        if isinstance(value, torch.Tensor) and not is_dtensor(value) and value.shape == param.shape:
            # every rank holds the full tensor: take this rank's shard, no communication
            value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        loaded[key] = value
    return loaded
