"""compare.py on two hand-made pytest-benchmark JSONs: the pairing, ratios and spread."""

import json

from bench import compare


def _bench(op, impl, median_s, shape, mode="fwd", nbytes=3_000_000_000):
    info = {"op": op, "mode": mode, "impl": impl, "dtype": "bf16", "shape": shape, "bytes": nbytes}
    return {"extra_info": info, "stats": {"median": median_s, "rounds": 10, "iterations": 1}}


def _write(path, benchmarks):
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return str(path)


def test_compare_pairs_cases_and_reports_the_spread(tmp_path, capsys):
    copy = _bench("copy", "torch", 1e-3, [2**28], mode="copy")  # 3000 GB/s
    before = _write(
        tmp_path / "before.json",
        [
            copy,
            _bench("rms_norm", "fastnn-native", 2e-3, [32768, 4096]),  # 1500 GB/s: 50%
            _bench("rms_norm", "compile", 1e-3, [32768, 4096]),
            _bench("rms_norm", "liger", 1e-3, [32768, 4096]),  # not in `after`: left out
        ],
    )
    after = _write(
        tmp_path / "after.json",
        [
            copy,
            _bench("rms_norm", "fastnn-native", 1e-3, [32768, 4096]),  # 2x faster: 100%
            _bench("rms_norm", "compile", 1.1e-3, [32768, 4096]),
        ],
    )
    assert compare.main([before, after]) == 0
    out = capsys.readouterr().out
    assert (
        "| rms_norm | fwd | bf16 | [32768, 4096] | fastnn-native | 2,000.0 | 1,000.0 | 0.500 "
        "| 50% | 100% |" in out
    )
    assert "| rms_norm | fwd | bf16 | [32768, 4096] | compile | 1,000.0 | 1,100.0 | 1.100 |" in out
    assert "liger" not in out
    # copy 1.000, native 0.500, compile 1.100
    assert (
        "3 cases, after / before: min 0.500, p10 0.500, median 1.000, p90 1.000, max 1.100" in out
    )

    assert compare.main([before, after, "--impl", "compile"]) == 0
    assert "1 cases" in capsys.readouterr().out


def test_compare_without_common_cases(tmp_path, capsys):
    a = _write(tmp_path / "a.json", [_bench("rms_norm", "eager", 1e-3, [8, 8])])
    b = _write(tmp_path / "b.json", [_bench("layer_norm", "eager", 1e-3, [8, 8])])
    assert compare.main([a, b]) == 1
    assert "no case measured in both runs" in capsys.readouterr().out
