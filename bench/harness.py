"""The benchmark harness shared by bench/test_*.py.

- Device: CUDA when present (override with FASTNN_BENCH_DEVICE=cpu|cuda), else the CPU.
- Profile: `smoke` under `--benchmark-disable` (every case runs once on tiny tensors: CI's check
  that each benchmark still runs), else the device's own sizes (`cuda` or `cpu`).
- Timing: on a GPU, pytest-benchmark's timer is replaced by CUDA events (`CudaEventTimer`), so a
  round is GPU time between two events around `iterations` back-to-back calls, started behind a
  GPU sleep so that host overhead never shows in it: the kernels' time, as in a training step
  whose host runs ahead of the GPU.
  On the CPU (and in the smoke run) every implementation of one case is timed in alternating
  rounds when that case's first test runs (`run_case`), and each test then reports its own rounds
  to pytest-benchmark: a burst of load on the 2 shared cores slows every implementation of the
  case alike instead of whichever happened to run then, so the ratios of medians hold. On the
  CPU each round follows one untimed call of the same implementation (steady state).
- Bytes: every entry records `bytes` (the op's fixed formula, computed by the
  test) in extra_info, with op / mode / impl / dtype / shape, so report.py derives GB/s.
- Budget: FASTNN_BENCH_BUDGET_S (seconds from session start) skips the cases that would start
  after it, with the reason, so `make gpu-check` always ends with a report.
"""

import importlib.util
import os
import time

import pytest
import torch

DEVICE = os.environ.get("FASTNN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"FASTNN_BENCH_DEVICE must be cpu or cuda, got {DEVICE!r}")

_profile = DEVICE  # set to "smoke" by conftest.py under --benchmark-disable
_session_start = time.monotonic()

# Rounds of `iterations` calls each, after warm-up rounds. On a GPU 10 x 10 calls of 0.1-1 ms keep
# an entry near 50 ms; on the CPU single calls of a few ms, 7 rounds after a warm-up, each behind
# an untimed call (time_interleaved's `primed`), the median of which is what the report shows
# (the 2 shared cores are noisy: compare only entries from one run).
ROUNDS = {"cuda": (3, 10, 10), "cpu": (1, 7, 1), "smoke": (0, 1, 1)}  # (warmup, rounds, iters)
# What the report's header says of the method (bench/conftest.py records it with the run).
TIMING = {
    "cuda": "CUDA events around each round, started behind a GPU sleep longer than the host's "
    "queueing time",
    "cpu": "wall clock, the implementations of each case in alternating rounds, each round right "
    "after an untimed call of the same implementation",
    "smoke": "none (smoke run)",
}
GPU_BYTES_PER_ROUND = 32e9  # about 10 ms at 3 TB/s: calls per GPU round, at most ROUNDS' count

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _load_tolerances():
    # By path: a `tests` package installed in site-packages (some wheels ship one) would shadow
    # the repository's tests/ folder, which is a namespace package.
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    spec = importlib.util.spec_from_file_location(
        "fastnn_tests_tolerances", f"{path}/tolerances.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tolerances = _load_tolerances()  # tests/tolerances.py's table


def headline(*values):
    """A parametrize case that runs before the others (conftest.py sorts them first), so the
    LLaMA-sized cases make the report even when a time budget cuts the sweeps short."""
    return pytest.param(*values, marks=pytest.mark.headline)


def set_profile(name):
    global _profile
    _profile = name


def profile():
    """'cuda', 'cpu' (timed runs on that device) or 'smoke' (each case once, tiny tensors)."""
    return _profile


def budget_left():
    """Seconds left of FASTNN_BENCH_BUDGET_S (None: no budget)."""
    budget = os.environ.get("FASTNN_BENCH_BUDGET_S")
    if not budget:
        return None
    return float(budget) - (time.monotonic() - _session_start)


def device_name():
    """The GPU's name, or the CPU's model name."""
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


_sleep_cycles_per_s = None


def gpu_sleep(seconds):
    """Queue a spin of about `seconds` on the current stream (torch.cuda._sleep counts cycles:
    its rate is measured once)."""
    global _sleep_cycles_per_s
    if _sleep_cycles_per_s is None:
        torch.cuda._sleep(1000)  # loads the kernel
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _sleep_cycles_per_s = 10_000_000 / (begin.elapsed_time(end) / 1e3)
    torch.cuda._sleep(max(1, int(seconds * _sleep_cycles_per_s)))


class CudaEventTimer:
    """A pytest-benchmark timer read from CUDA events.

    pytest-benchmark calls the timer before and after each round (start, end, start, end, ...)
    and takes the difference. Each call records an event, waits for it, and adds the interval
    since the previous call's start event to a running sum (one float32 interval, ~0.5 us
    resolution; a single base event would lose resolution after minutes). At a round's start it
    then queues a GPU sleep and records the start event behind it. The sleep outlasts the host
    time the last round took to queue its calls (1.5x, at most 50 ms), so the GPU starts a round
    once it is queued: a round measures GPU time even when a call's host overhead (Python,
    autograd, dispatch) exceeds its GPU time. Before this, ~100 us norm cases moved by 0.5-4x
    between two runs on one H100 (2026-11-25, runs started while test processes wound down);
    host overhead is the suspected cause, not yet confirmed on a GPU.
    """

    __name__ = "cuda_event_timer"
    MAX_SLEEP_S = 0.05

    def __init__(self, host_clock=time.perf_counter):
        self._clock = host_clock
        self._start = None  # the event after the sleep: where the GPU starts the next round
        self._seconds = 0.0
        self._calls = 0
        self._queued_s = 0.0  # host time to queue the last round's calls
        self._returned = None

    def __call__(self):
        entered = self._clock()
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        if self._start is not None:
            self._seconds += self._start.elapsed_time(end) / 1e3
        if self._calls % 2 == 1:  # a round's end: the host queued its calls since the start
            self._queued_s = entered - self._returned
        else:  # a round's start
            gpu_sleep(min(self.MAX_SLEEP_S, 1.5 * self._queued_s + 1e-4))
        self._calls += 1
        self._start = torch.cuda.Event(enable_timing=True)
        self._start.record()
        self._returned = self._clock()
        return self._seconds


def run(benchmark, fn, *, nbytes, info, timing=None):
    """Time `fn()` with pytest-benchmark in pedantic mode and record what report.py needs.

    nbytes: bytes one call moves by the fixed formula; info: op, mode, impl, dtype, shape (and
    anything else to keep); timing: (warm-up rounds, rounds, calls per round), else ROUNDS.
    """
    if DEVICE == "cuda":
        benchmark._timer = CudaEventTimer()  # no public hook for a per-test timer in 5.x
    benchmark.extra_info.update(info, bytes=int(nbytes), device=DEVICE, profile=profile())
    warmup, rounds, iterations = timing or ROUNDS[profile()]
    if DEVICE == "cuda":  # big cases (4 GiB tensors): fewer calls, so a round stays ~10 ms
        iterations = max(1, min(iterations, int(GPU_BYTES_PER_ROUND // max(nbytes, 1))))
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=iterations)


class ReplayTimer:
    """A pytest-benchmark timer that returns rounds measured beforehand: pytest-benchmark calls
    it at each round's start and end and records the difference, which is the next round."""

    __name__ = "interleaved_wall_clock"

    def __init__(self, round_seconds):
        self._rounds = list(round_seconds)
        self._now = 0.0
        self._calls = 0

    def __call__(self):
        if self._calls % 2 == 1:  # a round's end
            self._now += self._rounds[self._calls // 2]
        self._calls += 1
        return self._now


_interleaved = {}  # case key -> {impl: round seconds, or the exception its setup or call raised}


def time_interleaved(builds, timing, primed=False):
    """Wall-clock rounds of every implementation of one case, alternating between them.

    builds: {impl: setup()} where setup() returns (fn, nbytes, info) or raises (a pytest.skip
    included). Round r runs the implementations in turn starting from the r-th, so none always
    follows the same one; warm-up rounds likewise. primed: each round follows one untimed call
    of the same implementation, so it measures the steady state of back-to-back calls, as in a
    training loop, whatever ran in between (in the dev VM, memory a call freed a second earlier
    may have gone back to the host and costs host page faults: 40-460 ms rounds of a 40 ms
    case). Returns {impl: (rounds, nbytes, info)} or {impl: exception}: one implementation
    failing does not stop the others.
    """
    warmup, rounds, iterations = timing
    results, cases = {}, {}
    for impl, setup in builds.items():
        try:
            cases[impl] = setup()
        except (Exception, pytest.skip.Exception) as e:  # noqa: BLE001 - re-raised by its test
            results[impl] = e
    times = {impl: [] for impl in cases}
    for r in range(warmup + rounds):
        live = [impl for impl in cases if impl not in results]
        for impl in live[r % len(live) :] + live[: r % len(live)] if live else []:
            fn = cases[impl][0]
            try:
                if primed:
                    fn()
                begin = time.perf_counter()
                for _ in range(iterations):
                    fn()
                sync()
                elapsed = time.perf_counter() - begin
            except Exception as e:  # noqa: BLE001 - re-raised by its test
                results[impl] = e
                continue
            if r >= warmup:
                times[impl].append(elapsed)
    for impl, (_, nbytes, info) in cases.items():
        results.setdefault(impl, (times[impl], nbytes, info))
    return results


def run_case(benchmark, impl, impls, setup, *, case, timing=None):
    """Time implementation `impl` of one case (`case`: a hashable key naming it without impl).

    setup(impl) prepares one implementation: returns (fn, nbytes, info) for `run`, or raises
    pytest.skip. On a GPU it is called for `impl` alone (CUDA events time each test by itself);
    elsewhere the case's first test times all of `impls` in alternating rounds
    (`time_interleaved`) and every test of the case reports its own.
    """
    timing = timing or ROUNDS[profile()]
    if DEVICE == "cuda":
        try:
            fn, nbytes, info = setup(impl)
            return run(benchmark, fn, nbytes=nbytes, info=info, timing=timing)
        except torch.cuda.OutOfMemoryError as e:  # a peer's or the reference's limit: a skip
            torch.cuda.empty_cache()
            pytest.skip(f"{impl} ran out of GPU memory at this shape: {e}"[:200])
    if case not in _interleaved:
        names = [getattr(i, "values", (i,))[0] for i in impls]  # pytest.param entries too
        _interleaved[case] = time_interleaved(
            {name: (lambda name=name: setup(name)) for name in names},
            timing,
            primed=profile() == "cpu",
        )
    result = _interleaved[case][impl]
    if isinstance(result, BaseException):
        raise result
    round_seconds, nbytes, info = result
    benchmark.extra_info.update(info, bytes=int(nbytes), device=DEVICE, profile=profile())
    benchmark.extra_info["interleaved"] = True
    benchmark._timer = ReplayTimer(round_seconds)  # (the smoke run ran each call above)
    _, rounds, iterations = timing
    return benchmark.pedantic(lambda: None, rounds=rounds, iterations=iterations)


def randn(shape, dtype, requires_grad=False, scale=1.0):
    """Random normal data on DEVICE (never zeros: they can run faster than real data)."""
    t = torch.randn(shape, device=DEVICE, dtype=torch.float32).mul_(scale).to(dtype)
    return t.requires_grad_(requires_grad)


def rows_for(n, elements):
    """Rows of an [rows, n] tensor of about `elements` elements (at least one row)."""
    return max(1, elements // n)


def case_rows(dtype_name, width, elements, target_rows):
    """Rows for a [rows, width] case: target_rows[profile][(dtype_name, width)] when the issue
    states its target at that shape, else about elements[profile] elements."""
    target = target_rows.get(profile(), {}).get((dtype_name, width))
    return target or rows_for(width, elements[profile()])


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
