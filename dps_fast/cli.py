"""`dps-fast` command line (also `python -m dps_fast`).

Each subcommand lives in its own module exposing add_arguments(parser) and
run(args); this file only wires them up.
"""
import argparse
import importlib

# subcommand -> (module, one-line help)
COMMANDS = {
    "info": ("dps_fast.info", "versions, compiled kernels, and which backends can run here (and why not)"),
    "finetune": ("dps_fast.finetune", "fine-tune the bundled MiniLM on MR or TREC-6: AdamW, DPS and baselines"),
    "bench": ("dps_fast.bench", "update throughput: torch AdamW, published-style DPS, dps_fast backends"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dps-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)
