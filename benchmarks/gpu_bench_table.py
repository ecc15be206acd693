"""The short bench table that benchmarks/gpu_check.sh prints last: for each
saved `dps-fast bench` JSON, the CUDA rows of every dps_fast backend and of
the published-style mechanism against fused AdamW, with the issue's targets.

    python benchmarks/gpu_bench_table.py bench.json [bench-large.json ...]

Each cell: the paired ratio to the fused-AdamW step ("x fused") and the
achieved bandwidth as % of the copy bandwidth measured in the same run.
Targets: explore and exploit steps at >= 80% of copy bandwidth; the
selection over all the weights in under 2 fused-AdamW steps (at BERT-large size).
"""
import sys

from dps_fast.bench.report import load_result

PHASES = [("step", "explore"), ("step", "exploit"), ("step", "exploit freeze"), ("boundary", "select")]


def _cell(row):
    if row is None:
        return "-"
    if "error" in row:
        return "FAILED"
    ratio = row.get("vs_fused")
    return (f"{ratio:.2f}x" if ratio is not None else "?x") + (f" {row['pct_copy']:.0f}%" if "pct_copy" in row else "")


def table(path):
    result = load_result(path)  # checked: a malformed file is one line below, not a traceback
    lines = []
    for key, info in result["devices"].items():
        if not key.startswith("cuda"):
            continue
        if "error" in info:
            lines.append(f"{path}: {key} could not be set up: {info['error']}")
            continue
        rows = [r for r in result["rows"] if r["device"] == key]
        fused = next((r for r in rows if r["method"] == "AdamW fused" and "median_s" in r), None)
        done = "" if result["meta"].get("finished", True) else f"; INCOMPLETE ({len(rows)} rows)"
        lines.append(f"{path}: {info['name']}, {info['params'] / 1e6:.0f}M parameters, copy "
                     f"{info['copy_gbps']:.0f} GB/s; fused AdamW step "
                     + (f"{fused['median_s'] * 1e3:.3f} ms" if fused else "missing")
                     + f"; {sum('error' in r for r in rows)} of {len(rows)} rows failed{done}")
        lines.append(f"{'x fused, % copy':<16}" + "".join(f"{phase:>16}" for _, phase in PHASES))
        methods = list(dict.fromkeys(r["method"] for r in rows if r.get("backend"))) + ["published DPS"]
        for method in methods:
            cells = [_cell(next((r for r in rows if r["method"] == method and (r["section"], r["phase"]) == phase),
                                None)) for phase in PHASES]
            lines.append(f"{method:<16}" + "".join(f"{cell:>16}" for cell in cells))
    return lines


def main():
    lines = []
    for path in sys.argv[1:]:
        try:
            lines += table(path) + [""]
        except ValueError as error:  # saved.SavedFileError
            lines.append(f"{path}: no bench table ({error})")
    lines.append("targets: explore, exploit >= 80% of copy; select at BERT-large size < 2.00x (2 fused steps)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
