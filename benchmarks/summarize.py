"""Markdown summary of a benchmark JSON: python -m benchmarks.summarize FILE.

Prints the machine line and, per dtype, layout and mode, the geometric-mean
and range of bnext's speedup over torch eager and over torch.compile, and
the median time in copies for both, as used in the top-level README.
"""

import json
import math
import statistics
import sys


def _gm(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(data):
    m = data["machine"]
    lines = [
        f"Machine: {m.get('gpu') or m.get('cpu')}, {m['threads']} threads, torch {m['torch']}, "
        f"bnext {m['bnext']} (commit {m.get('git_commit', '?')}), allocator: {m.get('malloc', '?')}, {m['date']}.",
        "",
        "| dtype | layout | mode | vs torch (geomean) | vs torch (min–max) | vs torch.compile (geomean) "
        "| bnext copies (median) | torch copies (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = data["results"]
    for dt in dict.fromkeys(r["dtype"] for r in rows):
        for layout in ("contiguous", "channels_last"):
            for mode in ("fwd", "fwdbwd", "eval"):
                sel = [r for r in rows if r["dtype"] == dt and r["layout"] == layout and r["mode"] == mode]
                if not sel:
                    continue
                sp = [r["speedup_vs_torch"] for r in sel]
                comp = [r["speedup_vs_compile"] for r in sel if "speedup_vs_compile" in r]
                lines.append(
                    f"| {dt} | {'NCHW' if layout == 'contiguous' else 'channels_last'} | {mode} "
                    f"| {_gm(sp):.2f}x | {min(sp):.2f}–{max(sp):.2f}x "
                    f"| {(f'{_gm(comp):.2f}x' if comp else 'n/a')} "
                    f"| {statistics.median(r['copies']['bnext'] for r in sel):.2f} "
                    f"| {statistics.median(r['copies']['torch'] for r in sel):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(summarize(json.load(f)))
