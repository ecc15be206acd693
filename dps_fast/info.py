"""`dps-fast info`: versions, the compiled kernels, and which backend can run
on which device here (and why not)."""
import importlib
import importlib.metadata
import os
import platform

import torch

from . import __version__, backends

COMPILED = ("dps_fast._cpu_kernels", "dps_fast._cuda_kernels")


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _compiled_line(name):
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        return f"not built ({error})"
    where = os.path.basename(module.__file__)
    if name.endswith("_cpu_kernels"):
        return (f"built ({where}); kernels for {module.isa()} (this CPU runs: {', '.join(module.runnable_isas())}), "
                f"OpenMP {'on' if module.openmp else 'off (one thread)'}")
    version = module.runtime_version
    runs = module.unavailable_reason()
    return (f"built ({where}) with CUDA {version // 1000}.{version % 1000 // 10} for sm {module.archs}; "
            + ("runtime reaches a GPU" if runs is None else f"cannot run here: {runs}"))


def _gpus():
    if torch.version.cuda is None and not torch.version.hip:
        return ["none (this torch is a CPU-only build)"]
    if not torch.cuda.is_available():
        return ["none (torch.cuda.is_available() is False)"]
    return [f"cuda:{i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]


def report():
    """The report as a list of lines."""
    cuda = torch.version.cuda or (f"HIP {torch.version.hip}" if torch.version.hip else "none")
    lines = [f"dps_fast {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
             f"python {platform.python_version()}, torch {torch.__version__} (CUDA {cuda}), "
             f"triton {_version('triton')}",
             f"CPU: {platform.machine()}, {os.cpu_count()} logical CPUs, torch uses {torch.get_num_threads()} threads",
             "GPU: " + "; ".join(_gpus()),
             "compiled modules:"]
    lines += [f"  {name:<24} {_compiled_line(name)}" for name in COMPILED]
    for device in ("cpu", "cuda"):
        try:
            auto = backends.resolve("auto", device).NAME
        except RuntimeError as error:
            auto = f"none ({error})"
        lines.append(f"backends on {device} tensors (backend='auto' picks {auto}):")
        for name in backends.BACKEND_NAMES:
            reason = backends.unavailable_reason(name, device)
            lines.append(f"  {name:<7} " + ("yes" if reason is None else f"no: {reason}"))
    return lines


def add_arguments(parser):
    pass


def run(args):
    print("\n".join(report()))
    return 0
