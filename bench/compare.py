"""Compare two benchmark runs case by case.

    python -m bench.compare BEFORE/benchmark.json AFTER/benchmark.json [--impl NAME ...]

For every case both runs measured (op, mode, dtype, shape, implementation) it prints the median
time of each run, their ratio (after / before: above 1 is slower) and each run's % of its own
copy bandwidth, then the spread of the ratios (min, 10th percentile, median, 90th, max). Two uses:
run-to-run agreement (the same code measured twice) and a change's effect, where the
implementations the change did not touch (torch.compile, eager) are the control: their ratios
show how far the machines or runs differ.
"""

import argparse

from bench import report


def cases(rows):
    """{(op, mode, dtype, shape, impl): entry} of report.entries()."""
    return {(r["op"], r["mode"], r["dtype"], tuple(r["shape"]), r["impl"]): r for r in rows}


def percentile(sorted_values, q):
    """The q-quantile (0 <= q <= 1) of sorted values, the nearest rank below."""
    return sorted_values[int(q * (len(sorted_values) - 1))]


def compare(before_rows, after_rows, impls=None):
    """[(key, before entry, after entry, ratio)] for the cases in both, in report order."""
    before, after = cases(before_rows), cases(after_rows)
    common = [k for k in before if k in after and (not impls or k[4] in impls)]
    common.sort(key=lambda k: (k[0], k[1], k[2], k[3][::-1], k[4]))  # shapes by N, then rows
    return [(k, before[k], after[k], after[k]["median_s"] / before[k]["median_s"]) for k in common]


def spread(ratios):
    """(min, p10, median, p90, max) of the ratios."""
    r = sorted(ratios)
    return tuple(percentile(r, q) for q in (0.0, 0.1, 0.5, 0.9, 1.0))


def _pct(entry, copy):
    return f"{100 * entry['gbps'] / copy:.0f}%" if copy else "-"


def format_table(pairs, copy_before, copy_after):
    lines = [
        "| op | mode | dtype | shape | impl | before µs | after µs | after / before "
        "| % of copy before | after |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (op, mode, dtype, shape, impl), b, a, ratio in pairs:
        lines.append(
            f"| {op} | {mode} | {dtype} | {list(shape)} | {impl} | {b['median_s'] * 1e6:,.1f} "
            f"| {a['median_s'] * 1e6:,.1f} | {ratio:.3f} | {_pct(b, copy_before)} "
            f"| {_pct(a, copy_after)} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--impl", action="append", help="only this implementation (repeatable)")
    args = parser.parse_args(argv)
    before = report.entries(report.load(args.before))
    after = report.entries(report.load(args.after))
    pairs = compare(before, after, args.impl)
    if not pairs:
        print("no case measured in both runs")
        return 1
    print(format_table(pairs, report.copy_gbps(before), report.copy_gbps(after)))
    lo, p10, med, p90, hi = spread([p[3] for p in pairs])
    print(
        f"\n{len(pairs)} cases, after / before: min {lo:.3f}, p10 {p10:.3f}, median {med:.3f}, "
        f"p90 {p90:.3f}, max {hi:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
