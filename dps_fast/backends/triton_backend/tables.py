"""What the Triton kernels share: how a launch finds its tensors (one table per
call, one program per chunk), the launch configurations, and the notes that
explain them.

Note [table layout]
One launch covers every tensor of a call (per dtype pair of params and grads;
usually one launch). Its table, built on the host by upload() and copied to
the device in one transfer, holds a row of int64 per non-empty tensor (NUMEL,
FIRST_CHUNK, then the kernel's own columns: addresses, flags), the owning
tensor of each chunk of CHUNK entries, then the kernel's extra int64 values
(the selection's state) and fp32 values (the update's bias corrections; steps
are host ints per tensor). Program i handles chunk i: 64-bit arithmetic only
for the chunk's base addresses (address()), 32-bit indices inside it. Every
section starts on a 16-byte boundary: Triton specialises pointer arguments on
that, so sections aligned by chance would compile a kernel per tensor count's
parity. The table holds addresses only: every tensor it names, copies
included, must stay referenced until the launch is queued.

Note [whole blocks, then the tail]
A program runs the whole BLOCKs of its chunk first, then the rest, so that the
main loop's bounds are multiples of BLOCK and, with every tensor ALIGN-byte
aligned (addressable() copies those that are not), its loads and stores
compile to 16-byte vector accesses.

Note [interpreter]
With TRITON_INTERPRET=1 set before this package is imported, the kernels are
defined interpreted for good: CPU tensors only, for tests. There CHUNK is
smaller, one configuration is used (INTERPRETER_CONFIG: the interpreter
cannot time kernels), and fp32 -> bf16 is rounded on the bits, because the
interpreter truncates.
"""
import contextlib

import torch
import triton
import triton.language as tl

if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
    raise ImportError(f"triton {triton.__version__} is installed; this backend needs triton >= 3.6")

INTERPRETED = bool(triton.knobs.runtime.interpret)  # Note [interpreter]
# Entries per program; the tables depend on it, so it is fixed per process.
CHUNK = 8192 if INTERPRETED else 65536
INTERPRETER_CONFIG = (4096, 4)  # (BLOCK, num_warps)
# The selection's and the norms' kernels (one read of each entry) are not tuned.
UNTUNED_CONFIG = INTERPRETER_CONFIG if INTERPRETED else (4096, 8)
ALIGN = 16  # bytes; every tensor handed to a kernel starts on this boundary (vector loads)

# The first columns of every table row (Note [table layout]); each kernel's own follow.
NUMEL, FIRST_CHUNK = tl.constexpr(0), tl.constexpr(1)

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


@triton.jit
def chunk_of_program(rows_ptr, owners_ptr, FIELDS: tl.constexpr, CHUNK: tl.constexpr):
    """This program's tensor, its table row, and the first entry and length of its chunk."""
    chunk = tl.program_id(0)
    tensor = tl.load(owners_ptr + chunk)
    row = rows_ptr + tensor * FIELDS
    start = (chunk - tl.load(row + FIRST_CHUNK)) * CHUNK
    length = tl.minimum(tl.load(row + NUMEL) - start, CHUNK).to(tl.int32)
    return tensor, row, start, length


@triton.jit
def address(row, field, dtype: tl.constexpr, offset):
    """The tensor address stored in `field` of `row`, as a `dtype` pointer, moved by `offset`
    elements (64-bit; everything after it indexes within a chunk in 32 bits)."""
    ptr = tl.load(row + field).to(tl.pointer_type(dtype))
    return tl.multiple_of(ptr, 16) + offset  # 16 = ALIGN, which the host ensures


def launching_on(device):
    """A context in which Triton launches on `device` (it launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def addressable(tensors, copy_back=None):
    """`tensors` (a list, or None) as tensors a kernel can address directly: contiguous and
    ALIGN-byte aligned, else copies. Copies of tensors the kernel writes go in `copy_back`."""
    if tensors is None:
        return None
    out = []
    for tensor in tensors:
        if not (tensor.is_contiguous() and tensor.data_ptr() % ALIGN == 0):
            copy = tensor.clone(memory_format=torch.contiguous_format)
            if copy_back is not None:
                copy_back.append((tensor, copy))
            tensor = copy
        out.append(tensor)
    return out


def upload(device, fields, numels, floats=(), extra=()):
    """One call's table on `device` (Note [table layout]): a row [numel, first chunk,
    *fields] per tensor, the owning tensor of each chunk, `extra` int64 values, then
    `floats` as fp32. Returns the views (rows, owners, extra, floats) and the number of chunks."""
    numels = torch.tensor(numels, dtype=torch.int64)
    chunks = (numels + CHUNK - 1) // CHUNK
    first = torch.cumsum(chunks, 0) - chunks
    rows = torch.cat([numels[:, None], first[:, None], torch.tensor(fields, dtype=torch.int64)], 1)
    owners = torch.repeat_interleave(torch.arange(len(numels)), chunks)
    floats = torch.tensor(floats, dtype=torch.float32)
    parts = [rows.reshape(-1), owners, torch.tensor(extra, dtype=torch.int64), floats]
    padded = [torch.cat([part, part.new_zeros(-part.numel() % (16 // part.element_size()))]).view(torch.int64)
              for part in parts]
    table = torch.cat(padded)
    if device.type == "cuda":  # from pageable memory a "non-blocking" copy may wait for the stream
        table = table.pin_memory()
    views = table.to(device, non_blocking=True).split([part.numel() for part in padded])
    views = [view.view(part.dtype)[: part.numel()] for view, part in zip(views, parts)]
    return views, len(owners)
