"""State formats: how DPSAdamW stores a parameter's exp_avg, exp_avg_sq and score.

One home for what a format is (the dtype of each state tensor, its bytes per
entry, how a value is stored), read by the reference backend (the spec), the
compiled and Triton backends (a format code, as they get Mode and DType
codes: contract.StateFormat), the host checks (param_state), checkpoints and
the bench's bytes model.

- "fp32" (default; the published semantics): fp32 state, stored as computed.
- "bf16": bf16 state, stored with stochastic rounding (dps_fast.rounding).
  Rounding to nearest would freeze exp_avg_sq: its per-step change,
  (1 - beta2) = 1e-3 of itself, is below half a bf16 ulp.
- "8bit": exp_avg and exp_avg_sq as uint8 codes of the parameter's shape, each
  with one fp32 scale per block of 256 entries (the state entries
  SCALE_KEYS: 1-D, ceil(numel / 256) scales), quantized block-wise to the
  nearest code of a dynamic map (signed for exp_avg, unsigned for exp_avg_sq),
  deterministically: dps_fast.blockwise says how, with its one tie rule (a
  value at a midpoint takes the lower code) and its zero and NaN blocks. The
  score is bf16 with stochastic rounding, as "bf16" stores it. A store
  requantizes each block, after the update of all its entries, with its new
  absmax; under masked="freeze" a block none of whose entries is updated is
  left as it is (codes and scale), and a block with both kinds takes the
  larger of its old scale and its updated entries' absmax: its frozen entries
  keep their codes while the scale stays, and are requantized from their
  values only when it grows (reference._store_moment). A positive exp_avg_sq
  never reads back as 0 (dps_fast.blockwise). 4.16 bytes per entry of a
  managed tensor (bytes_per_entry).
  Tensors of fewer than 4096 entries (biases, LayerNorm: a small share of a
  model) keep "bf16" state, as float64 ones keep float64 state: there codes
  would save at most 8 KB per tensor over bf16, so the choice is about error
  and code paths, and bf16 with stochastic rounding is the "bf16" format's own
  path (no third kind of state in a group; bf16 scores throughout), unbiased,
  and finer than a code (8 significant bits per entry, no scale shared with
  255 others). The anchors (bitsandbytes' min_8bit_size, torchao) keep fp32
  there, at 4 more bytes per entry.

Math is fp32 whatever the storage: each state entry is loaded, updated and
stored once per step. float64 parameters keep float64 state in every format.
"""
import dataclasses

import torch

from . import blockwise

STATE_KEYS = ("exp_avg", "exp_avg_sq", "score")  # the state tensors of a parameter's shape
SCALE_KEYS = {"exp_avg": "exp_avg_scale", "exp_avg_sq": "exp_avg_sq_scale"}  # an 8-bit moment's block scales
SIGNED = {"exp_avg": True, "exp_avg_sq": False}  # which code map an 8-bit moment uses (dps_fast.blockwise)
MASK_BYTES = 1 / 8  # a managed tensor's packed mask bit, in every format


@dataclasses.dataclass(frozen=True)
class StateFormat:
    name: str
    code: int  # contract.StateFormat, what the kernels receive
    dtype: torch.dtype  # of exp_avg and exp_avg_sq (uint8: 8-bit codes); float64 parameters: float64
    score_dtype: torch.dtype
    stochastic: bool  # its bf16 stores round stochastically
    block: int = 0  # entries per block scale of a moment (0: the moments are floats, no scales)
    small: str = ""  # the format of tensors of fewer than `threshold` entries and of float64 ones
    threshold: int = 0
    kernels: bool = True  # stored by the compiled and Triton backends (else by backend="torch" only, so far)

    @property
    def quantized(self):
        return self.block > 0

    def for_param(self, param):
        """The format `param`'s state is kept in: this one, or `small` for a float64
        parameter or one of fewer than `threshold` entries."""
        if self.small and (param.dtype == torch.float64 or param.numel() < self.threshold):
            return FORMATS[self.small]
        return self

    def dtype_for(self, param, key="exp_avg"):
        """The dtype of `param`'s state tensor `key` (of STATE_KEYS or SCALE_KEYS' values)."""
        if param.dtype == torch.float64:
            return torch.float64
        if key in SCALE_KEYS.values():
            return torch.float32
        format = self.for_param(param)
        return format.score_dtype if key == "score" else format.dtype

    def bytes_per_entry(self, managed, param_dtype=torch.float32):
        """State bytes per parameter entry of a tensor kept in this format (of an 8-bit
        format's smaller tensors: of(small).bytes_per_entry): two moments with their
        share of the block scales, and for a managed tensor its score and mask bit."""
        if param_dtype == torch.float64:
            moment = score = 8
        else:
            moment = self.dtype.itemsize + (torch.float32.itemsize / self.block if self.block else 0)
            score = self.score_dtype.itemsize
        return 2 * moment + ((score + MASK_BYTES) if managed else 0)


FORMATS = {format.name: format for format in (
    StateFormat("fp32", 0, torch.float32, torch.float32, stochastic=False),
    StateFormat("bf16", 1, torch.bfloat16, torch.bfloat16, stochastic=True),
    StateFormat("8bit", 2, torch.uint8, torch.bfloat16, stochastic=True, block=blockwise.BLOCK, small="bf16",
                threshold=4096, kernels=False),
)}
NAMES = tuple(FORMATS)
ROUNDINGS = ("nearest", "stochastic")  # of bf16/fp16 parameter stores (the `rounding` option)


def of(name):
    """The StateFormat called `name` (a group's state_dtype)."""
    return FORMATS[name]


def needs_random_bits(format, rounding, param):
    """Whether a step of `param` draws stochastic-rounding bits: its state's format
    stores so, or rounding="stochastic" on a bf16/fp16 parameter."""
    if param.dtype == torch.float64:
        return False
    return format.for_param(param).stochastic or (rounding == "stochastic" and param.dtype in (torch.bfloat16,
                                                                                                torch.float16))


def kernel_refusal(name):
    """None if the compiled and Triton backends store state format `name`, else why not."""
    if of(name).kernels:
        return None
    return f"no compiled or Triton kernel stores state_dtype={name!r} yet (backend='torch' does)"
