"""report.py on a hand-made pytest-benchmark JSON: the derived numbers are the right ones."""

import json

from bench import report


def _bench(op, mode, impl, median_s, nbytes, shape, dtype="bf16", headline=False):
    info = {"op": op, "mode": mode, "impl": impl, "dtype": dtype, "shape": shape, "bytes": nbytes}
    if headline:
        info["headline"] = True
    return {"extra_info": info, "stats": {"median": median_s, "rounds": 10, "iterations": 10}}


def _write(tmp_path, benchmarks, skipped=None):
    data = {
        "machine_info": {"fastnn": {"device": "cuda", "device_name": "Test GPU", "torch": "x"}},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "datetime": "2026-11-25T12:00:00",
        "benchmarks": benchmarks,
        "skipped_summary": skipped or {},
    }
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps(data))
    return path


def test_report_numbers(tmp_path):
    benchmarks = [
        _bench("copy", "copy", "torch", 1e-3, 3_000_000_000, [2**28], "fp32"),  # 3000 GB/s
        # 1.5 GB in 1 ms = 1500 GB/s = 50% of copy; eager 4 ms, compile 2 ms.
        _bench("rms_norm", "fwd", "fastnn-native", 1e-3, 1_500_000_000, [4096, 512], headline=True),
        _bench("rms_norm", "fwd", "fastnn-torch", 3e-3, 1_500_000_000, [4096, 512], headline=True),
        _bench("rms_norm", "fwd", "eager", 4e-3, 1_500_000_000, [4096, 512], headline=True),
        _bench("rms_norm", "fwd", "compile", 2e-3, 1_500_000_000, [4096, 512], headline=True),
        _bench("rms_norm", "fwd", "eager", 1e-3, 1_000_000_000, [2048, 1024]),
        _bench("adamw", "step", "fastnn-triton", 5e-3, 10_000_000_000, [10**9], "fp32"),
    ]
    path = _write(tmp_path, benchmarks, {"Skipped: no liger": 3})
    text = (tmp_path / report.write_report(str(path), str(tmp_path))).read_text()
    assert "**3,000 GB/s**" in text
    assert "| bf16 | [4096, 512] | fastnn-native | 1,000 | 1,500 | 50% | 4.00x | 2.00x |" in text
    assert "| bf16 | [4096, 512] | eager | 4,000 | 375 | 12% | 1.00x | 0.50x |" in text
    # No compile entry at this shape: its speedup column says so instead of inventing one.
    assert "| bf16 | [2048, 1024] | eager | 1,000 | 1,000 | 33% | 1.00x | - |" in text
    assert "| fp32 | [1000000000] | fastnn-triton | 5,000 | 2,000 | 67% | - | - |" in text
    assert "| 3 | Skipped: no liger |" in text
    # Summary: GB/s per implementation in IMPL_ORDER, the fastest fastnn backend and its ratios.
    assert "| op | mode | dtype | shape | eager | compile | fastnn-torch | fastnn-native |" in text
    assert (
        "| rms_norm | fwd | bf16 | [4096, 512] | 375 | 750 | 500 | 1,500 | fastnn-native | 4.00x | 2.00x |"
        in text
    )
    # Two values of N for rms_norm: a plot; the optimizer has no sweep: none.
    assert (tmp_path / "rms_norm.png").stat().st_size > 0
    assert not (tmp_path / "adamw.png").exists()


def test_report_without_copy(tmp_path):
    path = _write(tmp_path, [_bench("swiglu", "bwd", "eager", 2e-6, 1000, [1, 100], "fp32")])
    text = (tmp_path / report.write_report(str(path), str(tmp_path))).read_text()
    assert "| fp32 | [1, 100] | eager | 2.0 | 0.50 | - | 1.00x | - |" in text


def test_targets_section(tmp_path):
    square = [4096, 4096]
    benchmarks = [
        _bench("rms_norm", "fwd", "eager", 3e-3, 10**9, square, "fp32"),
        _bench("rms_norm", "fwd", "fastnn-native", 1e-3, 10**9, square, "fp32"),  # 3x: holds
        _bench("layer_norm", "fwd", "eager", 1e-3, 10**9, square, "fp32"),
        _bench("layer_norm", "fwd", "fastnn-native", 1.25e-3, 10**9, square, "fp32"),  # 0.8x
    ]
    path = _write(tmp_path, benchmarks)
    data = json.loads(path.read_text())
    data["machine_info"]["fastnn"]["device"] = "cpu"
    path.write_text(json.dumps(data))
    text = (tmp_path / report.write_report(str(path), str(tmp_path))).read_text()
    row = "| RMSNorm fwd [4096, 4096] fp32: >= 2x F.rms_norm | fastnn-native | 3.00x | yes |"
    assert row in text
    row = "| LayerNorm fwd [4096, 4096] fp32: >= F.layer_norm | fastnn-native | 0.80x | **no** |"
    assert row in text
    # No entries for it in this run: said, not passed.
    row = (
        "| SwiGLU fwd [4096, 4096] fp32: >= 1.4x F.silu(g) * u | fastnn-native | - | not measured |"
    )
    assert row in text


def test_gpu_targets_take_the_worst_target_shape(tmp_path):
    # On CUDA the norms are judged by Triton (auto's choice there), SwiGLU by native.
    rows = [
        _bench("copy", "copy", "torch", 1e-3, 3_000_000_000, [2**28], "fp32"),  # 3000 GB/s
        # 2,850 and 2,400 GB/s at the target rows; 300 GB/s at N = 512 is outside 1K-64K.
        _bench("rms_norm", "fwd", "fastnn-triton", 1e-3, 2_850_000_000, [32768, 1024]),
        _bench("rms_norm", "fwd", "fastnn-triton", 1e-3, 2_400_000_000, [32768, 65536]),
        _bench("rms_norm", "fwd", "fastnn-triton", 1e-3, 300_000_000, [131072, 512]),
        _bench("rms_norm", "fwd", "fastnn-native", 1e-3, 2_900_000_000, [32768, 65536]),  # unjudged
        _bench("rms_norm", "fwd", "compile", 2e-3, 2_850_000_000, [32768, 1024]),
        _bench("rms_norm", "bwd", "fastnn-triton", 2e-3, 2_850_000_000, [32768, 1024]),
        _bench("rms_norm", "bwd", "compile", 1e-3, 2_850_000_000, [32768, 1024]),
        # torch.compile 4x faster at N = 512: outside the target's N, not its worst case
        _bench("rms_norm", "fwd", "compile", 0.25e-3, 300_000_000, [131072, 512]),
        _bench("swiglu", "fwd", "fastnn-native", 1e-3, 2_850_000_000, [32768, 11008]),
        _bench("swiglu", "bwd", "fastnn-native", 1e-3, 2_850_000_000, [32768, 11008]),
        _bench("swiglu", "bwd", "fastnn-triton", 1e-3, 300_000_000, [32768, 11008]),  # unjudged
    ]
    text = (tmp_path / report.write_report(str(_write(tmp_path, rows)), str(tmp_path))).read_text()
    head = "| RMSNorm fwd bf16, N 1K-64K at 32K rows: >= 90% of copy | fastnn-triton |"
    assert f"{head} 80% at worst (fwd [32768, 65536]) | **no** |" in text
    head = "| RMSNorm bwd bf16, N 1K-64K at 32K rows: >= 80% of copy | fastnn-triton |"
    assert f"{head} 48% at worst (bwd [32768, 1024]) | **no** |" in text
    head = "| RMSNorm bf16, N 1K-64K at 32K rows: faster than torch.compile at every N | fastnn-triton |"
    assert f"{head} 0.50x at worst (bwd [32768, 1024]) | **no** |" in text
    head = "| SwiGLU fwd and bwd [32768, 11008] bf16: >= 90% of copy | fastnn-native |"
    assert f"{head} 95% at worst (fwd [32768, 11008]) | yes |" in text
