"""Host time per eager call at a small shape, where a call's kernels take a few microseconds and
the host (Python, autograd, dispatch, launches) sets the pace: what the suite's GPU timer hides
by design (bench/harness.py puts a GPU sleep before each round so that host time never shows).

    python -m bench.host_time [--calls 100] [--rounds 7] [--out DIR]

Cases: RMSNorm, RMSNorm with the residual add (eager: x + r, then the norm), LayerNorm and
SwiGLU on [2, 8, 1024] input (bf16 on a GPU, fp32 on the CPU), each as a forward under
torch.no_grad (inference) and as forward + backward (training, .backward() into leaves). A
round times `calls` back-to-back calls of one implementation, wall clock, the device
synchronised before and after, and reports the time per call; the implementations take turns
within each round, in a shuffled order (a burst of load on a shared host hits all alike); the
median of `rounds` rounds is reported. On a GPU the kernels of these shapes run faster than the
host queues them, so the time per call is the host's.

Implementations: `eager` (torch's ops), `compile` (torch.compile of the same eager code),
`liger` (Liger-Kernel, CUDA only, no fused residual), `fastnn` (backend `auto`) and
`fastnn-<backend>` forced (Triton on a GPU only: interpreted, its host time means nothing).
Results: host_time.md and host_time.json in --out (default: printed only).
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastnn
from bench import harness, impls

SHAPE = (2, 8, 1024)
CASES = ("rms_norm", "rms_norm_residual", "layer_norm", "swiglu")
MODES = ("fwd no_grad", "fwd+bwd")
IMPLS = (
    "eager",
    "compile",
    "liger",
    "fastnn",
    "fastnn-native",
    "fastnn-triton",
    "fastnn-torch",
)
EPS = 1e-6
_FAMILY = {"rms_norm_residual": "rms_norm", "swiglu": "glu"}


def _eager(case):
    n = SHAPE[-1]
    return {
        "rms_norm": lambda x, w: F.rms_norm(x, (n,), w, EPS),
        "rms_norm_residual": lambda x, r, w: (lambda s: (F.rms_norm(s, (n,), w, EPS), s))(x + r),
        "layer_norm": lambda x, w, b: F.layer_norm(x, (n,), w, b, EPS),
        "swiglu": lambda g, u: F.silu(g) * u,
    }[case]


def _fastnn(case):
    n, fn = SHAPE[-1], fastnn.functional
    return {
        "rms_norm": lambda x, w: fn.rms_norm(x, (n,), w, EPS),
        "rms_norm_residual": lambda x, r, w: fn.rms_norm(x, (n,), w, EPS, residual=r),
        "layer_norm": lambda x, w, b: fn.layer_norm(x, (n,), w, b, EPS),
        "swiglu": fn.swiglu,
    }[case]


def unavailable(impl, case):
    """None when `impl` runs `case` here, else why not."""
    family = _FAMILY.get(case, case)
    if impl == "liger" and case == "rms_norm_residual":
        return "Liger-Kernel has no fused residual RMSNorm"
    if impl == "fastnn-triton" and harness.DEVICE != "cuda":
        return "Triton runs interpreted on a CPU: its host time means nothing"
    if impl == "fastnn":
        return None
    return impls.unavailable(impl, family)


def _function(impl, case):
    if impl == "eager":
        return _eager(case)
    if impl == "compile":
        return torch.compile(_eager(case), dynamic=False)
    if impl == "liger":
        liger = impls.get("liger", _FAMILY.get(case, case))
        if case == "rms_norm":
            return lambda x, w: liger(x, w, EPS)
        if case == "layer_norm":
            return lambda x, w, b: liger(x, w, b, EPS)
        return liger
    return _fastnn(case)


def _inputs(case, dtype):
    """Leaves that require grad: the activations, then the params."""
    n = SHAPE[-1]
    acts = [harness.randn(SHAPE, dtype, requires_grad=True) for _ in range(2)]
    params = [harness.randn((n,), dtype, requires_grad=True) for _ in range(2)]
    return {
        "rms_norm": [acts[0], params[0]],
        "rms_norm_residual": [*acts, params[0]],
        "layer_norm": [acts[0], *params],
        "swiglu": acts,
    }[case]


def _step(fn, inputs, mode):
    """One call: the forward, or the forward and its backward into the leaves' .grad."""
    if mode == "fwd no_grad":
        return lambda: fn(*inputs)
    grads = {}

    def step():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if not grads:
            grads["dy"] = [torch.ones_like(o) for o in outs]
        torch.autograd.backward(outs, grads["dy"])

    return step


def _round(step, calls, mode):
    harness.sync()
    with torch.no_grad() if mode == "fwd no_grad" else torch.enable_grad():
        start = time.perf_counter()
        for _ in range(calls):
            step()
        harness.sync()
        return (time.perf_counter() - start) / calls


def _backend_of(impl):
    return impl.split("-", 1)[1] if impl.startswith("fastnn-") else "auto"


def measure(case, mode, calls, rounds, impl_names=IMPLS):
    """{impl: [seconds per call, one per round]} and {impl: why skipped}."""
    dtype = torch.bfloat16 if harness.DEVICE == "cuda" else torch.float32
    steps, skipped = {}, {}
    for impl in impl_names:
        why = unavailable(impl, case)
        if why is not None:
            skipped[impl] = why
            continue
        with fastnn.use_backend(_backend_of(impl)):
            steps[impl] = _step(_function(impl, case), _inputs(case, dtype), mode)
            for _ in range(3):  # warm-up: compilation, Triton's first launches, caches
                _round(steps[impl], 1, mode)
    times = {impl: [] for impl in steps}
    for r in range(rounds):
        # Shuffled per round, so that no implementation always runs right after the same one.
        order = list(steps)
        random.Random(r).shuffle(order)
        for impl in order:
            with fastnn.use_backend(_backend_of(impl)):
                times[impl].append(_round(steps[impl], calls, mode))
    return times, skipped


def table(results):
    """Markdown: per case and mode, each implementation's median us per call and fastnn's
    ratio to eager (> 1: fastnn takes more host time)."""
    shown = [i for i in IMPLS if any(i in r["times"] for r in results)]
    lines = [
        "| case | mode | " + " | ".join(shown) + " | fastnn / eager |",
        "| --- | --- | " + " | ".join("---:" for _ in shown) + " | ---: |",
    ]
    for r in results:
        med = {i: statistics.median(t) * 1e6 for i, t in r["times"].items()}
        cells = [f"{med[i]:.1f}" if i in med else "-" for i in shown]
        ratio = f"{med['fastnn'] / med['eager']:.2f}x" if {"fastnn", "eager"} <= med.keys() else "-"
        lines.append(f"| {r['case']} | {r['mode']} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def _report(results, skipped, args):
    dtype = "bf16" if harness.DEVICE == "cuda" else "fp32"
    threads = "" if harness.DEVICE == "cuda" else f", {torch.get_num_threads()} threads"
    return (
        f"# Host time per eager call: {harness.device_name()}{threads}\n\n"
        f"us per call, median of {args.rounds} rounds of {args.calls} back-to-back calls, input "
        f"{list(SHAPE)} {dtype}; torch {torch.__version__}; `python -m bench.host_time` "
        "(its docstring has the method).\n\n"
        f"{table(results)}\n\n"
        + "".join(f"- skipped {k}: {w}\n" for k, w in sorted(skipped.items()))
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results, skipped = [], {}
    for case in args.cases.split(","):
        for mode in MODES:
            times, why = measure(case, mode, args.calls, args.rounds)
            results.append({"case": case, "mode": mode, "times": times})
            skipped.update({f"{impl} ({case})": w for impl, w in why.items()})
            print(f"host_time: {case}, {mode}: done", file=sys.stderr, flush=True)
            if args.out:  # rewritten after every case: a run cut short keeps what it measured
                with open(os.path.join(args.out, "host_time.md"), "w") as f:
                    f.write(_report(results, skipped, args))
                with open(os.path.join(args.out, "host_time.json"), "w") as f:
                    json.dump({"shape": SHAPE, "results": results}, f, indent=1)
    print(_report(results, skipped, args))


if __name__ == "__main__":
    main()
