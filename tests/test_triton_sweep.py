"""bench/triton_sweep.py, the GPU launch-config sweep of the Triton norm kernels, checked on the
CPU: every kind of config it times computes what the launchers' own choices compute (under the
interpreter, with blocks small enough that short rows loop), and the launchers get their
policies back afterwards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import triton_sweep


def test_every_config_kind_computes_the_norm():
    pytest.importorskip("triton")
    bad = triton_sweep.check(ns=(2500,), rows=6)  # whole rows of 4096 and loops of 512
    assert not bad, "\n".join(f"{case} {config.label()}: {err}" for case, config, err in bad)


def test_launched_with_restores_the_policies():
    """The swapped policies reach every module that calls them: norm_common's own helpers
    (fwd_grid and persistent_grid ask persistent_programs) and the launchers that import them."""
    from fastnn.triton_kernels import layer_norm, norm_common, rms_norm

    modules = (norm_common, rms_norm, layer_norm)
    before = [getattr(m, name, None) for m in modules for name in triton_sweep._POLICIES]
    config = triton_sweep.Config(2, 1024, True, 8, per_sm=2)
    with triton_sweep.launched_with(config):
        assert rms_norm.row_config(5, 1000, None, 0, True, rms_norm.BWD) == (2, 1024, True, 8)
        for i, name in enumerate(triton_sweep._POLICIES):
            assert getattr(norm_common, name) is not before[i]
            for m in modules:  # the launchers that import it by name
                assert getattr(m, name, None) in (None, getattr(norm_common, name))
    after = [getattr(m, name, None) for m in modules for name in triton_sweep._POLICIES]
    assert after == before


def test_gpu_cases_have_candidates():
    for op, direction, n in triton_sweep.CASES:
        configs = triton_sweep.candidates(op, direction, n)
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
    configs = triton_sweep.candidates("rms_norm", "bwd", 300, triton_sweep.CHECK_SPACE)
    assert len(records) == 2 + len(configs)  # the current choice, before and after
    assert [r["role"] for r in records[:: len(records) - 1]] == ["current", "current (again)"]
    assert all(r["us"] and r["error"] is None for r in records), records
    table = (tmp_path / "sweep.md").read_text()
    chosen = records[0]["label"]
    assert (
        chosen.startswith("current: rows 1x512, ")
        and f"| rms_norm | bwd | 300 | {chosen} |" in table
    )
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == len(records)


def test_static_mode_compiles_configs_for_sm90(tmp_path):
    """--static compiles candidates for sm_90 without a GPU (a subprocess: the interpreter is off
    there) and records each kernel's resources."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    args = ["--static", "--ops", "rms_norm", "--dirs", "fwd", "--n", "1024", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.triton_sweep", *args],
        cwd=root, env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    if proc.returncode != 0 and "no ptxas in this triton" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (tmp_path / "static.jsonl").read_text().splitlines()]
    assert len(records) == len(triton_sweep.candidates("rms_norm", "fwd", 1024))
    assert all(r["kernels"] and r["kernels"][0]["regs"] > 0 for r in records)


def test_a_config_that_leaves_outputs_unwritten_disagrees():
    """Outputs start as NaN in the agreement check, so columns a config never writes cannot
    borrow the right values from the block the allocator hands back."""
    pytest.importorskip("triton")
    import torch

    inputs = triton_sweep.make_inputs("rms_norm", "fwd", 6, 300, torch.bfloat16, "cpu")
    with triton_sweep.launched_with(None):
        ref = triton_sweep.run_op("rms_norm", "fwd", inputs)
    short_rows = triton_sweep.Config(1, 256, True, 4)  # whole rows of 256 < 300 columns
    real = torch.empty, torch.empty_like, torch.Tensor.new_empty
    with triton_sweep.launched_with(short_rows), triton_sweep.nan_filled_allocations():
        assert torch.zeros(2).new_empty(3).isnan().all()
        got = triton_sweep.run_op("rms_norm", "fwd", inputs)
    assert triton_sweep.disagreement(got, ref) == float("inf")
    assert (torch.empty, torch.empty_like, torch.Tensor.new_empty) == real
