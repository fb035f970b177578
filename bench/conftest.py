"""pytest configuration of the benchmark suite (bench/harness.py explains the method).

Adds to pytest-benchmark's JSON what report.py needs: the device and software versions in
machine_info, and the skipped cases with their reasons under "skipped"."""

import collections
import importlib.metadata
import importlib.util
import os
import platform

import pytest
import torch

from bench import harness

_skipped = []
_load_at_start = None


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)  # 1-minute load average: how busy the host was
    except OSError:
        return None


def pytest_configure(config):
    global _load_at_start
    _load_at_start = _loadavg()
    config.addinivalue_line("markers", "headline: a case that runs first (harness.headline)")
    config.addinivalue_line("markers", "bench_last: a slow case that runs after all others")
    disabled = config.getoption("benchmark_disable", False) and not config.getoption(
        "benchmark_enable", False
    )
    if disabled:
        harness.set_profile("smoke")
        if harness.DEVICE == "cpu":
            # The smoke run also drives the Triton backend once, interpreted (about 1 ms per
            # program; the smoke tensors need a few dozen). Triton reads this when a kernel
            # module is first imported, which happens at the first call of one of its ops.
            os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    # Headline cases first, slow ones last (stable: file and parameter order otherwise), so that
    # a time budget cuts the N sweeps, never the copy ceiling or the LLaMA-sized cases.
    items.sort(
        key=lambda item: (
            item.get_closest_marker("bench_last") is not None,
            item.get_closest_marker("headline") is None,
        )
    )


def pytest_report_header(config):
    return (
        f"fastnn bench: device={harness.DEVICE} ({harness.device_name()}), "
        f"profile={harness.profile()}"
    )


def pytest_runtest_setup(item):
    left = harness.budget_left()
    if left is not None and left <= 0 and "benchmark" in getattr(item, "fixturenames", ()):
        pytest.skip("time budget (FASTNN_BENCH_BUDGET_S) spent before this case started")


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(0)
    if "benchmark" in request.fixturenames and request.node.get_closest_marker("headline"):
        request.getfixturevalue("benchmark").extra_info["headline"] = True  # report's summary
    yield
    if harness.DEVICE == "cuda":
        torch.cuda.empty_cache()  # the next case's tensors may be several GB


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append({"name": report.nodeid.split("::")[-1], "reason": reason})


def _version(module, distribution):
    """The installed version (from the package metadata: liger_kernel has no __version__)."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return getattr(importlib.import_module(module), "__version__", "unknown")


def pytest_benchmark_update_machine_info(config, machine_info):
    info = {
        "device": harness.DEVICE,
        "device_name": harness.device_name(),
        "profile": harness.profile(),
        "timing": harness.TIMING[harness.profile()],
        "torch": torch.__version__,
        "triton": _version("triton", "triton"),
        "liger_kernel": _version("liger_kernel", "liger-kernel"),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": _load_at_start,
        "loadavg_end": _loadavg(),
    }
    if harness.DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            cuda=torch.version.cuda,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    machine_info["fastnn"] = info


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = _skipped
    output_json["skipped_summary"] = collections.Counter(s["reason"] for s in _skipped)
