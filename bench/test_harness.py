"""The harness's own logic, checked without a GPU: the CUDA-event timer's arithmetic (with a
fake event clock) and the byte formulas against a speed-of-light table."""

import pytest
import torch

from bench import harness
from bench.test_glu import glu_bytes
from bench.test_norms import norm_bytes
from bench.test_optim import optim_bytes


class _FakeEvent:
    now_ms = 0.0  # the fake GPU clock

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        self.t = _FakeEvent.now_ms

    def synchronize(self):
        assert self.t is not None

    def elapsed_time(self, end):
        # float32 like cudaEventElapsedTime: large spans lose resolution, short ones do not.
        return float(torch.tensor(end.t - self.t, dtype=torch.float32))


def test_cuda_event_timer_differences_are_event_intervals(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    sleeps = []

    def fake_sleep(seconds):  # the GPU spins: its clock moves, the round must not count it
        sleeps.append(seconds)
        _FakeEvent.now_ms += seconds * 1e3

    monkeypatch.setattr(harness, "gpu_sleep", fake_sleep)
    host = [0.0]
    timer = harness.CudaEventTimer(host_clock=lambda: host[0])
    _FakeEvent.now_ms = 1.0e7  # hours into a session: a single base event would be coarse here
    start = timer()
    host[0] += 0.004  # the host takes 4 ms to queue the round's calls ...
    _FakeEvent.now_ms += 0.123  # ... which take 0.123 ms of GPU time after the sleep
    end = timer()
    assert end - start == pytest.approx(0.123e-3, rel=1e-4)
    host[0] += 5.0
    _FakeEvent.now_ms += 5000.0  # time between rounds counts in neither round
    start = timer()
    # This round starts behind a sleep longer than the last round took to queue.
    assert sleeps[-1] == pytest.approx(1.5 * 0.004 + 1e-4)
    _FakeEvent.now_ms += 0.0015
    assert timer() - start == pytest.approx(1.5e-6, rel=1e-3)
    timer()
    host[0] += 1.0  # a compile in this round: the sleep before the next one is capped
    timer()
    timer()
    assert sleeps[-1] == harness.CudaEventTimer.MAX_SLEEP_S
    assert len(sleeps) == 4  # one per round start, none at a round's end


def test_bytes_match_speed_of_light_table():
    """At 3.0 TB/s, RMSNorm [32768, 4096] bf16 fwd 179 us, bwd 270 us;
    SwiGLU [32768, 11008] bf16 fwd 721 us, bwd 1.20 ms; Adam on 1e9 fp32 params 9.3 ms."""
    us = lambda nbytes: nbytes / 3.0e12 * 1e6  # noqa: E731
    assert us(norm_bytes("rms_norm", "fwd", 32768, 4096, 2)) == pytest.approx(179, abs=1)
    assert us(norm_bytes("rms_norm", "bwd", 32768, 4096, 2)) == pytest.approx(270, abs=2)
    assert us(glu_bytes("fwd", 32768 * 11008, 2)) == pytest.approx(721, abs=1)
    assert us(glu_bytes("bwd", 32768 * 11008, 2)) == pytest.approx(1202, abs=2)
    p = torch.empty(0, dtype=torch.float32)
    per_param = optim_bytes([p.new_empty(1000)], "adam") / 1000
    assert per_param == 28 and us(per_param * 1e9) == pytest.approx(9333, abs=1)
    assert optim_bytes([p.new_empty(10)], "rmsprop") == 10 * 20
    assert optim_bytes([p.new_empty(10)], "rmsprop-centered-momentum") == 10 * 36
    # LayerNorm: one more parameter vector and one more fp32 statistic per row than RMSNorm.
    extra = norm_bytes("layer_norm", "bwd", 8, 64, 2) - norm_bytes("rms_norm", "bwd", 8, 64, 2)
    assert extra == 64 * 2 + 8 * 4


def test_interleaved_rounds_alternate_and_failures_stay_with_their_impl(monkeypatch):
    calls = []
    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])

    def setup(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds

        return lambda: (fn, 100, {"impl": name})

    def broken_setup():
        pytest.skip("not here")

    def failing_call():
        raise RuntimeError("kernel failed")

    builds = {
        "a": setup("a", 1.0),
        "skipped": broken_setup,
        "b": setup("b", 2.0),
        "fails": lambda: (failing_call, 1, {}),
    }
    results = harness.time_interleaved(builds, timing=(1, 3, 2))  # 1 warm-up + 3 rounds of 2
    # Each round starts one implementation later; a failed one drops out of later rounds.
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a"] * 2
    assert results["a"] == ([2.0, 2.0, 2.0], 100, {"impl": "a"})
    assert results["b"][0] == [4.0, 4.0, 4.0]
    assert isinstance(results["skipped"], pytest.skip.Exception)
    assert isinstance(results["fails"], RuntimeError)


def test_primed_rounds_follow_an_untimed_call(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    calls = []

    def fn():
        calls.append(clock[0])
        clock[0] += 1.0 if len(calls) % 2 else 0.25  # the untimed call is the slow one

    results = harness.time_interleaved({"a": lambda: (fn, 1, {})}, timing=(0, 3, 1), primed=True)
    assert len(calls) == 6 and results["a"][0] == [0.25, 0.25, 0.25]


def test_replay_timer_gives_pytest_benchmark_the_measured_rounds():
    timer = harness.ReplayTimer([0.5, 0.25])
    start = timer()
    first = timer() - start
    start = timer()
    assert (first, timer() - start) == (0.5, 0.25)


def test_gpu_path_times_each_test_alone_and_skips_out_of_memory(monkeypatch):
    monkeypatch.setattr(harness, "DEVICE", "cuda")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    ran = []
    monkeypatch.setattr(harness, "run", lambda benchmark, fn, **kw: ran.append((fn, kw)))

    def setup(impl):
        if impl == "big":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return (lambda: None), 123, {"impl": impl}

    harness.run_case(None, "small", ["small", "big"], setup, case=("gpu", 1), timing=(0, 1, 1))
    assert len(ran) == 1 and ran[0][1]["nbytes"] == 123  # only this test's implementation
    with pytest.raises(pytest.skip.Exception, match="big ran out of GPU memory"):
        harness.run_case(None, "big", ["small", "big"], setup, case=("gpu", 1))


def test_big_gpu_cases_take_fewer_calls_per_round(monkeypatch):
    monkeypatch.setattr(harness, "DEVICE", "cuda")
    monkeypatch.setattr(harness, "CudaEventTimer", lambda: None)

    class Bench:
        extra_info = {}

        def pedantic(self, fn, rounds, warmup_rounds, iterations):
            return iterations

    assert harness.run(Bench(), None, nbytes=10**9, info={}, timing=(3, 10, 10)) == 10
    assert harness.run(Bench(), None, nbytes=8 * 10**9, info={}, timing=(3, 10, 10)) == 4
    assert harness.run(Bench(), None, nbytes=10**11, info={}, timing=(3, 10, 10)) == 1
