"""argparse types shared by the command lines (`dps-fast bench`, `dps-fast finetune`).

Each checks one option's value and says what it wants; argparse turns the
ArgumentTypeError into a usage error (exit 2) that names the option.
"""
import argparse
import math
import os


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float), finite, in the given range."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    wanted = ("an integer" if kind is int else "a number") + (
        f" in {lo}, {hi}" if lo and hi else f" {'>' if low_open else '>='} {low:g}" if lo else "")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}; got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or (
                high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"must be {wanted}; got {text!r}")
        return value

    return parse


def writable(text):
    """An argparse type: a file path this process can write (no file is created)."""
    path = os.path.abspath(text)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
    return text


def plot_path(text):
    """An argparse type: a writable path in a format matplotlib writes (by its
    extension; none: matplotlib's default, PNG)."""
    writable(text)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise argparse.ArgumentTypeError("needs matplotlib (pip install matplotlib)") from None
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    extension = os.path.splitext(text)[1][1:].lower()
    if extension and extension not in formats:
        raise argparse.ArgumentTypeError(f"{text}: matplotlib writes {', '.join(sorted(formats))}, not {extension}")
    return text


def device(text):
    """An argparse type: a cpu or cuda device that exists here, as its name."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: runs on cpu and cuda devices")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return str(parsed)
