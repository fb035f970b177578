"""`make bench`: run the benchmark suite on the device present, then write the report.

    python -m bench.run [--out DIR] [--budget-s SECONDS] [pytest args...]

Results go to bench/results/<device>-<date>/ (or --out): benchmark.json (pytest-benchmark's, with
every round), bench.log (pytest's output), report.md and the plots. The copy bandwidth is one of
the benchmarks (bench/test_copy.py), so it is measured in the same run as the kernels. CUDA is
used when present (FASTNN_BENCH_DEVICE=cpu forces the CPU). --budget-s skips the cases that would
start after that many seconds, so the report is always written.
"""

import argparse
import datetime
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Copy first (the ceiling), then the ops by how much of a step they are, optimizers last.
FILES = ["test_copy.py", "test_norms.py", "test_glu.py", "test_optim.py"]


def device_slug():
    """'nvidia-h100-80gb-hbm3', or 'cpu-<model>' on a machine without CUDA."""
    from bench import harness

    name = harness.device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if harness.DEVICE == "cpu":
        slug = "cpu-" + re.sub(r"-?(r|tm|cpu|processor)(?=-|$)", "", slug)
    return slug[:48].strip("-")


def default_out():
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return os.path.join(ROOT, "bench", "results", f"{device_slug()}-{date}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results folder (default bench/results/<device>-<date>)")
    parser.add_argument("--budget-s", type=float, help="skip cases starting after this long")
    parser.add_argument("--print-out", action="store_true", help="print the default folder, exit")
    args, pytest_args = parser.parse_known_args(argv)
    if args.print_out:
        print(default_out())
        return 0
    out = os.path.abspath(args.out or default_out())
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "benchmark.json")
    env = dict(os.environ)
    if args.budget_s is not None:
        env["FASTNN_BENCH_BUDGET_S"] = str(args.budget_s)
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
        *[os.path.join("bench", f) for f in FILES],
        f"--benchmark-json={json_path}", "--benchmark-quiet", *pytest_args,
    ]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    with open(os.path.join(out, "bench.log"), "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        rc = proc.wait()
    if not os.path.exists(json_path):
        print(f"bench: pytest wrote no {json_path} (exit {rc})", file=sys.stderr)
        return rc or 1
    from bench import report

    path = report.write_report(json_path, out)
    print(f"bench: report in {os.path.relpath(path, ROOT)} (pytest exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
