"""bench/triton_sweep.py, the GPU launch-config sweep of the Triton norm kernels, checked on the
CPU: every kind of config it times computes what the launchers' own choices compute (under the
interpreter, with blocks small enough that short rows loop), and the launchers get their
policies back afterwards."""

import pytest

from bench import triton_sweep


def test_every_config_kind_computes_the_norm():
    pytest.importorskip("triton")
    bad = triton_sweep.check(ns=(2500,), rows=6)  # whole rows of 4096 and loops of 512
    assert not bad, "\n".join(f"{case} {config.label()}: {err}" for case, config, err in bad)


def test_launched_with_restores_the_policies():
    from fastnn.triton_kernels import layer_norm, rms_norm

    before = [
        getattr(m, name, None) for m in (rms_norm, layer_norm) for name in triton_sweep._POLICIES
    ]
    config = triton_sweep.Config(2, 1024, True, 8, per_sm=2, stages=2)
    with triton_sweep.launched_with(config):
        assert rms_norm.row_config(5, 1000, None, 0, 0) == (2, 1024, True, 8)
        assert layer_norm.row_config is rms_norm.row_config
    after = [
        getattr(m, name, None) for m in (rms_norm, layer_norm) for name in triton_sweep._POLICIES
    ]
    assert after == before


def test_gpu_cases_have_candidates():
    for op, direction, n in triton_sweep.CASES:
        configs = triton_sweep.candidates(direction, n, has_stages=True)
        assert configs, (op, direction, n)
        assert len(set(configs)) == len(configs)
        assert all(c.single == (c.block_n >= n) for c in configs)


def test_dry_run_writes_the_tables(tmp_path, monkeypatch):
    """The GPU run's steps (compiling in worker processes, checking, timing, the tables) on the
    CPU: one case, one round of one call per config."""
    pytest.importorskip("triton")
    monkeypatch.setattr(triton_sweep, "ROUNDS", 1)
    monkeypatch.setattr(triton_sweep, "CALLS", 1)
    records = triton_sweep.sweep([("rms_norm", "bwd", 300)], 4, 600, str(tmp_path))
    configs = triton_sweep.candidates(
        "bwd", 300, triton_sweep.has_stages(), triton_sweep.CHECK_SPACE
    )
    assert len(records) == 1 + len(configs)
    assert all(r["us"] and r["error"] is None for r in records), records
    table = (tmp_path / "sweep.md").read_text()
    chosen = records[0]["label"]
    assert (
        chosen.startswith("current: rows 4x512, ")
        and f"| rms_norm | bwd | 300 | {chosen} |" in table
    )
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == len(records)
