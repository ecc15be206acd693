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

Math is fp32 whatever the storage: each state entry is loaded, updated and
stored once per step. float64 parameters keep float64 state in every format.
"""
import dataclasses

import torch

STATE_KEYS = ("exp_avg", "exp_avg_sq", "score")  # the state tensors a format stores
MASK_BYTES = 1 / 8  # a managed tensor's packed mask bit, in every format


@dataclasses.dataclass(frozen=True)
class StateFormat:
    name: str
    code: int  # contract.StateFormat, what the kernels receive
    dtype: torch.dtype  # of exp_avg, exp_avg_sq and score (float64 parameters: float64)
    stochastic: bool  # its stores round stochastically

    def dtype_for(self, param):
        """The dtype of `param`'s state tensors in this format."""
        return torch.float64 if param.dtype == torch.float64 else self.dtype

    def bytes_per_entry(self, managed, param_dtype=torch.float32):
        """State bytes per parameter entry: two moments, and for a managed tensor its
        score and mask bit."""
        item = 8 if param_dtype == torch.float64 else self.dtype.itemsize
        return 2 * item + ((item + MASK_BYTES) if managed else 0)


FORMATS = {format.name: format for format in (
    StateFormat("fp32", 0, torch.float32, stochastic=False),
    StateFormat("bf16", 1, torch.bfloat16, stochastic=True),
)}
NAMES = tuple(FORMATS)
ROUNDINGS = ("nearest", "stochastic")  # of bf16/fp16 parameter stores (the `rounding` option)


def of(name):
    """The StateFormat called `name` (a group's state_dtype)."""
    return FORMATS[name]


def needs_random_bits(format, rounding, param):
    """Whether a step of `param` draws stochastic-rounding bits: a format that
    stores its state so, or rounding="stochastic" on a bf16/fp16 parameter."""
    if param.dtype == torch.float64:
        return False
    return format.stochastic or (rounding == "stochastic" and param.dtype in (torch.bfloat16, torch.float16))
