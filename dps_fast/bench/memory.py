"""The bench's memory section: optimizer state per parameter, for each state
format and parameter dtype, beside torch.optim.AdamW and (when installed)
torchao's _AdamW(bf16_stochastic_round=True) and AdamW8bit.

Each row builds the weight set in the parameter dtype, makes the optimizer
and takes three steps (DPS with stages of one step: explore, exploit, explore,
so scores and masks both exist), and reports two measurements per parameter:
- state: the bytes of the tensors the optimizer keeps (its state dicts);
- peak: how far the process's peak memory rose above what it held before the
  optimizer was made (CPU: VmHWM, reset through /proc/self/clear_refs; CUDA:
  torch.cuda.max_memory_allocated): state plus the steps' transient buffers.
Each row runs in a fresh process, so that memory freed by an earlier row and
kept by the allocator does not hide this row's."""
import json
import os
import subprocess
import sys

import torch

from ..groups import param_groups
from ..optimizer import DPSAdamW
from .weights import weight_set

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _torchao():
    try:
        import torchao.optim
    except ImportError:
        return None
    return torchao.optim


def optimizers(param_dtype):
    """{label: make(model) -> optimizer} of the rows for parameters of `param_dtype` ("fp32"/"bf16")."""
    def dps(state_dtype):
        return lambda model: DPSAdamW(param_groups(model), stage_steps=1, state_dtype=state_dtype,
                                      rounding="stochastic" if param_dtype == "bf16" else "nearest")

    rows = {"AdamW": lambda model: torch.optim.AdamW(param_groups(model)),
            "dps_fast fp32 state": dps("fp32"), "dps_fast bf16 state": dps("bf16"),
            "dps_fast 8bit state": dps("8bit")}  # backend "torch" (the reference) until the kernels store it
    ao = _torchao()
    if ao is not None:
        if param_dtype == "bf16":
            rows["torchao AdamW bf16 stochastic"] = lambda model: ao._AdamW(param_groups(model),
                                                                            bf16_stochastic_round=True)
        rows["torchao AdamW8bit"] = lambda model: ao.AdamW8bit(param_groups(model))
    return rows


def _status_bytes(field):
    """A memory field of /proc/self/status (VmRSS: held now, VmHWM: the peak), in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def _held(device):
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _status_bytes("VmRSS")


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS


def _peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_bytes("VmHWM")


def _tensor_bytes(value):
    """Bytes a state value holds: a tensor's, or the inner tensors' of a tensor subclass
    (torchao's 8-bit state: codes and block scales)."""
    if not isinstance(value, torch.Tensor):
        return 0
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, name)) for name in names)
    return value.numel() * value.element_size()


def measure(label, param_dtype, scale, device, seed=0):
    """This row's numbers, in this process: {state_bytes_per_param, peak_bytes_per_param, params}."""
    device = torch.device(device)
    model = weight_set(scale, device, seed, DTYPES[param_dtype])
    params = sum(p.numel() for p in model.parameters())
    before = _held(device)
    _reset_peak(device)
    optimizer = optimizers(param_dtype)[label](model)
    for _ in range(3):
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = _peak(device) - before
    state = sum(_tensor_bytes(value) for entry in optimizer.state.values() for value in entry.values())
    return dict(state_bytes_per_param=state / params, peak_bytes_per_param=peak / params, params=params)


def row(device, label, param_dtype, scale, seed=0):
    """The memory row of `label` on parameters of `param_dtype`, measured in a fresh process."""
    base = dict(device=str(device), section="memory", method=label, phase=param_dtype, backend=None)
    code = (f"import json; from dps_fast.bench.memory import measure; "
            f"print(json.dumps(measure({label!r}, {param_dtype!r}, {scale!r}, {str(device)!r}, {seed!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return dict(base, error=last)
    return dict(base, **json.loads(done.stdout.strip().splitlines()[-1]))
