"""bench/host_time.py on the CPU, a few calls per case: every case and mode gets a row with a
time for each implementation that runs here, and the files are written."""

import json

from bench import host_time


def test_host_time_writes_a_row_per_case_and_mode(tmp_path, capsys):
    host_time.main(["--calls", "2", "--rounds", "2", "--out", str(tmp_path)])
    report = (tmp_path / "host_time.md").read_text()
    for case in host_time.CASES:
        for mode in host_time.MODES:
            assert f"| {case} | {mode} |" in report
    results = json.loads((tmp_path / "host_time.json").read_text())["results"]
    assert len(results) == len(host_time.CASES) * len(host_time.MODES)
    for r in results:
        assert {"eager", "fastnn"} <= r["times"].keys()
        assert all(len(t) == 2 and min(t) > 0 for t in r["times"].values())
    assert "skipped fastnn-triton (swiglu): Triton runs interpreted" in report
