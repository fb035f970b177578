"""Turn pytest-benchmark JSON from bench/ into a Markdown report and PNG plots.

    python -m bench.report RESULTS/benchmark.json [--out RESULTS]

Writes RESULTS/report.md: the issues' speed targets checked against the run (bench/targets.py),
per op and mode a table of every measured case (median time, GB/s by
the fixed byte formula each entry records, % of the copy bandwidth measured in the same run, and
speedups against eager torch and torch.compile), the skipped cases with their reasons; and
RESULTS/<op>.png: GB/s against N per implementation (one panel per mode), the measured copy
bandwidth drawn as the ceiling.
"""

import argparse
import collections
import json
import os

from bench import targets

BASELINES = ("eager", "compile")
IMPL_ORDER = (
    "eager-forloop",
    "eager",
    "eager-fused",
    "compile",
    "liger",
    "fastnn-torch",
    "fastnn-native",
    "fastnn-triton",
)
MODE_ORDER = ("fwd", "bwd", "fwd+bwd", "step")
DTYPE_ORDER = ("bf16", "fp16", "fp32")


def load(path):
    with open(path) as f:
        return json.load(f)


def entries(data):
    """One dict per benchmark: extra_info plus median seconds, rounds, calls per round, GB/s."""
    out = []
    for b in data["benchmarks"]:
        info = dict(b["extra_info"])
        if "bytes" not in info:
            continue
        median = b["stats"]["median"]
        info.update(
            median_s=median,
            rounds=b["stats"]["rounds"],
            iterations=b["stats"].get("iterations", 1),
            gbps=info["bytes"] / median / 1e9 if median > 0 else float("nan"),
        )
        out.append(info)
    return out


def copy_gbps(rows):
    copies = [r["gbps"] for r in rows if r["op"] == "copy"]
    return max(copies) if copies else None


def _rank(key, order):
    return (order.index(key) if key in order else len(order), key)


def _order(seq, order):
    return sorted(seq, key=lambda k: _rank(k, order))


def case_key(r):
    return (r["dtype"], tuple(r["shape"]))


def speedups(group):
    """{impl: {baseline: median_baseline / median_impl}} within one (op, mode, dtype, shape)."""
    by_impl = {r["impl"]: r["median_s"] for r in group}
    return {
        impl: {b: by_impl[b] / t for b in BASELINES if b in by_impl and t > 0}
        for impl, t in by_impl.items()
    }


def _fmt_time(s):
    us = s * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def _fmt_gbps(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def _fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def _shape(shape):
    return "[" + ", ".join(str(d) for d in shape) + "]"


def op_tables(rows, copy):
    """Markdown lines: one table per (op, mode)."""
    lines = []
    by_op = collections.defaultdict(list)
    for r in rows:
        if r["op"] != "copy":
            by_op[r["op"]].append(r)
    for op in sorted(by_op):
        lines.append(f"## {op}\n")
        modes = _order({r["mode"] for r in by_op[op]}, MODE_ORDER)
        for mode in modes:
            group_rows = [r for r in by_op[op] if r["mode"] == mode]
            lines.append(f"### {op} {mode}\n")
            lines.append(
                "| dtype | shape | impl | median µs | GB/s | % of copy | vs eager | vs compile |"
            )
            lines.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
            cases = collections.defaultdict(list)
            for r in group_rows:
                cases[case_key(r)].append(r)
            for key in sorted(cases, key=lambda k: (_rank(k[0], DTYPE_ORDER), k[1][-1], k[1])):
                group = cases[key]
                sp = speedups(group)
                for r in sorted(group, key=lambda r: _rank(r["impl"], IMPL_ORDER)):
                    pct = f"{100 * r['gbps'] / copy:.0f}%" if copy else "-"
                    s = sp[r["impl"]]
                    lines.append(
                        f"| {r['dtype']} | {_shape(r['shape'])} | {r['impl']} | "
                        f"{_fmt_time(r['median_s'])} | {_fmt_gbps(r['gbps'])} | {pct} | "
                        f"{_fmt_ratio(s.get('eager'))} | {_fmt_ratio(s.get('compile'))} |"
                    )
            lines.append("")
    return lines


def summary_table(rows, copy):
    """Markdown lines: GB/s of every implementation at the headline (LLaMA-sized) cases, one row
    per (op, mode, dtype, shape), and the best fastnn backend against eager and compile."""
    cases = collections.defaultdict(dict)
    for r in rows:
        if r.get("headline") and r["op"] != "copy":
            cases[(r["op"], r["mode"], r["dtype"], tuple(r["shape"]))][r["impl"]] = r
    if not cases:
        return []
    impls = _order({i for c in cases.values() for i in c}, IMPL_ORDER)
    lines = [
        "## Summary: GB/s at LLaMA-sized cases" + (f" (copy: {copy:,.0f} GB/s)" if copy else ""),
        "",
        "| op | mode | dtype | shape | "
        + " | ".join(impls)
        + " | best fastnn | vs eager | vs compile |",
        "| --- | --- | --- | --- | " + " | ".join("---:" for _ in impls) + " | --- | ---: | ---: |",
    ]
    for key in sorted(
        cases, key=lambda k: (k[0], _rank(k[1], MODE_ORDER), _rank(k[2], DTYPE_ORDER), k[3])
    ):
        case = cases[key]
        cells = [_fmt_gbps(case[i]["gbps"]) if i in case else "" for i in impls]
        ours = [i for i in case if i.startswith("fastnn-")]
        best, vs_eager, vs_compile = "-", None, None
        if ours:
            best = min(ours, key=lambda i: case[i]["median_s"])
            t = case[best]["median_s"]
            vs_eager = case["eager"]["median_s"] / t if "eager" in case else None
            vs_compile = case["compile"]["median_s"] / t if "compile" in case else None
        op, mode, dtype, shape = key
        lines.append(
            f"| {op} | {mode} | {dtype} | {_shape(shape)} | " + " | ".join(cells)
            + f" | {best} | {_fmt_ratio(vs_eager)} | {_fmt_ratio(vs_compile)} |"
        )  # fmt: skip
    return lines + [""]


def header(data, rows, copy):
    mi = data.get("machine_info", {})
    fx = mi.get("fastnn", {})
    ci = data.get("commit_info", {})
    lines = [
        f"# fastnn benchmarks: {fx.get('device_name', '?')}, {data.get('datetime', '?')[:10]}\n"
    ]
    sw = [f"torch {fx.get('torch')}", f"triton {fx.get('triton')}"]
    if fx.get("cuda"):
        sw.append(f"CUDA {fx['cuda']}, compute capability {fx.get('capability')}, "
                  f"{fx.get('sm_count')} SMs, {fx.get('memory_gib')} GiB")  # fmt: skip
    if fx.get("liger_kernel"):
        sw.append(f"liger-kernel {fx['liger_kernel']}")
    lines.append(f"- device: `{fx.get('device')}` ({fx.get('device_name')}); " + "; ".join(sw))
    lines.append(
        f"- host: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
        f"{fx.get('cpu_threads')} torch threads, Python {fx.get('python')}; 1-minute load "
        f"average {fx.get('loadavg_start')} at the start, {fx.get('loadavg_end')} at the end, on "
        f"{fx.get('cpu_count')} cores"
    )
    if ci.get("id"):
        lines.append(
            f"- commit: {ci['id'][:12]}{' (with uncommitted changes)' if ci.get('dirty') else ''}"
        )
    lines.append(f"- profile: `{fx.get('profile')}` ({len(rows)} timed entries)")
    if copy:
        c = next(r for r in rows if r["op"] == "copy")
        lines.append(
            f"- measured copy bandwidth: **{copy:,.0f} GB/s** (`dst.copy_(src)`, "
            f"{c['shape'][0]:,} fp32 elements, bytes read + written; median of {c['rounds']} rounds)"
        )
    # Runs say how they were timed (harness.TIMING); older JSON files did not.
    timer = fx.get("timing")
    if timer is None and fx.get("device") == "cuda":
        timer = "CUDA events around each round"
    elif timer is None and any(r.get("interleaved") for r in rows):
        timer = "wall clock, the implementations of each case in alternating rounds"
    elif timer is None:
        timer = "wall clock"
    lines += [
        f"- timing: {timer}; a round is one or more back-to-back calls, the table shows the "
        "median round divided by its calls",
        "- GB/s: the fixed byte formula of each op (documented in each "
        "bench/test_*.py; fp32 partial sums of dW / dB not counted) over the median time",
        "- vs eager / vs compile: that implementation's median time over this one's (above 1: "
        "this one is faster)",
        "",
    ]
    if fx.get("device") == "cpu":
        lines += [
            "CPU numbers come from a shared machine: only ratios within this run mean anything.",
            "",
        ]
    return lines


def skipped_lines(data):
    summary = data.get("skipped_summary") or {}
    if not summary:
        return []
    lines = ["## Skipped\n", "| cases | reason |", "| ---: | --- |"]
    for reason, count in sorted(summary.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {count} | {reason.replace('|', '/')} |")
    return lines + [""]


def _sweep_dtype(group):
    """The dtype with the most distinct N in `group` (the swept one)."""
    ns = collections.defaultdict(set)
    for r in group:
        ns[r["dtype"]].add(r["shape"][-1])
    return max(ns, key=lambda d: (len(ns[d]), -_rank(d, DTYPE_ORDER)[0]))


def plot(rows, copy, out_dir):
    """One PNG per op with an N sweep: GB/s vs N, a line per implementation, panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_op = collections.defaultdict(list)
    for r in rows:
        if r["op"] != "copy" and r["mode"] != "step":
            by_op[r["op"]].append(r)
    for op, group in sorted(by_op.items()):
        dtype = _sweep_dtype(group)
        group = [r for r in group if r["dtype"] == dtype]
        if len({r["shape"][-1] for r in group}) < 2:
            continue
        modes = _order({r["mode"] for r in group}, MODE_ORDER)
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            for impl in _order({r["impl"] for r in group}, IMPL_ORDER):
                pts = sorted(
                    (r["shape"][-1], r["gbps"])
                    for r in group
                    if r["mode"] == mode and r["impl"] == impl
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
            if copy:
                ax.axhline(copy, color="black", linestyle="--", linewidth=1, label="copy")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N (last dim)")
            ax.set_ylabel("GB/s")
            ax.set_title(f"{op} {mode}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_report(json_path, out_dir):
    """Writes report.md and the plots next to each other in out_dir; returns the report path."""
    data = load(json_path)
    rows = entries(data)
    copy = copy_gbps(rows)
    os.makedirs(out_dir, exist_ok=True)
    pngs = plot(rows, copy, out_dir)
    lines = header(data, rows, copy)
    if pngs:
        lines.append(
            "Plots: " + ", ".join(f"[{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs)
        )
        lines.append("")
    lines += summary_table(rows, copy)
    lines += targets.lines(rows, copy, data.get("machine_info", {}).get("fastnn", {}).get("device"))
    lines += op_tables(rows, copy)
    lines += skipped_lines(data)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="pytest-benchmark JSON written by bench/")
    parser.add_argument("--out", help="folder for report.md and the plots (default: the JSON's)")
    args = parser.parse_args(argv)
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    print(write_report(args.json, out))


if __name__ == "__main__":
    main()
