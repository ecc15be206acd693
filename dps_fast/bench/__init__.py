"""`dps-fast bench`: update throughput of torch AdamW, published-style DPS
and every dps_fast backend that runs here, per step and per stage boundary,
plus the whole fine-tuning step.

Per row: median time per call (min-max), parameters per second, effective
GB/s from the bytes model, that as % of the copy bandwidth measured in the
same run, the ratio to fused AdamW (timed alternately with each row), and
the persistent optimizer state in bytes per parameter.

    weights.py      the weight set and training-step encoder the rows work on
    cases.py        what each row times, and how it is built
    bytes_model.py  the bytes each row's work must move (GB/s, % copy)
    timing.py       repetitions, CUDA events, the copy bandwidth
    runner.py       every case of every device into one result (rows survive failures)
    report.py       the text tables, ratios, notes and the plot
    cli.py          the options, their checks, and the run
"""
from .cli import add_arguments, run

__all__ = ["add_arguments", "run"]
