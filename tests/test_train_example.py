"""examples/train_ddp.py end to end on 2 CPU ranks (gloo, 127.0.0.1, a free port): the fastnn
model and its plain PyTorch twin train alike from one seed (launched by torchrun), a stopped and
resumed run follows the uninterrupted one bit for bit, and FSDP2 resumes the DDP checkpoint and
trains as DDP does. Plus the pieces the example is built from, in process."""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import FORWARD, PARAM_GRAD, RTOL, rel_error

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_ddp.py"
# A tiny model and 8 steps: the launches cost seconds of imports each, the training far less.
TINY = [
    "--steps", "8", "--dim", "32", "--layers", "2", "--heads", "2", "--seq-len", "32",
    "--batch-size", "4", "--corpus-chars", "20000", "--log-every", "4",
]  # fmt: skip


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, torchrun=False, timeout=300):
    """Runs the example on 2 CPU ranks; returns rank 0's stdout. With torchrun=True through
    torchrun itself; else as two processes given the environment torchrun would give them (one
    import of torch fewer per launch: the launches' cost is mostly imports)."""
    port = str(_free_port())
    example = [str(EXAMPLE), "--device", "cpu", *TINY, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if torchrun:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", port, *example,
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, *example],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {r} of {example}\n{out[-4000:]}\n{err[-4000:]}"
    return outputs[0][0]


def losses(metrics_path):
    """{(run, step): loss averaged over ranks} from the --metrics file."""
    out = {}
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                out[(row["run"], row["step"])] = row["loss"]
    return out


def model_state(ckpt_path, run):
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)["runs"][run]["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One 8-step DDP run of the fastnn model and its PyTorch twin: (stdout, losses, ckpt)."""
    d = tmp_path_factory.mktemp("uninterrupted")
    out = launch(
        "--compare", "--ckpt", d / "ckpt.pt", "--metrics", d / "metrics.jsonl", torchrun=True
    )
    return out, losses(d / "metrics.jsonl"), d / "ckpt.pt"


def test_ddp_fastnn_and_pytorch_twins_give_the_same_losses_and_parameters(uninterrupted):
    out, loss, ckpt = uninterrupted
    assert sorted(loss) == [(run, s) for run in ("fastnn", "torch") for s in range(1, 9)]
    for s in range(1, 9):
        # Losses are forward values: the fp32 forward row of the table.
        assert abs(loss["fastnn", s] - loss["torch", s]) <= RTOL[torch.float32][FORWARD] * abs(
            loss["torch", s]
        ), (s, loss["fastnn", s], loss["torch", s])
    assert loss["fastnn", 8] < loss["fastnn", 1] - 0.2  # it learns: about 3.66 -> 3.26 here
    fast, plain = model_state(ckpt, "fastnn"), model_state(ckpt, "torch")
    assert fast.keys() == plain.keys()
    for name in fast:
        # Eight updates of weights whose gradients agree to the weight-grad row.
        err = rel_error(fast[name], plain[name])
        assert err <= RTOL[torch.float32][PARAM_GRAD], f"{name}: relative difference {err:.2e}"
    assert re.search(r"\[#{24}\] 8/8 \| fastnn loss \d\.\d{4} [\d.]+k tok/s \| torch loss", out)
    assert re.search(
        r"fastnn vs PyTorch \(2 x cpu, fp32, DDP\): final loss \d\.\d{4} vs \d\.\d{4} .*"
        r"speedup \d+\.\d\dx",
        out,
    ), out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The same run stopped after step 4 (as a job that hit its time limit): (losses, ckpt)."""
    d = tmp_path_factory.mktemp("stopped")
    ckpt = d / "ckpt.pt"
    out = launch("--compare", "--ckpt", ckpt, "--metrics", d / "m.jsonl", "--stop-after", 4)
    assert "stopped after step 4 of 8" in out
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    return losses(d / "m.jsonl"), ckpt


def test_stop_and_resume_follows_the_uninterrupted_run_exactly(uninterrupted, stopped, tmp_path):
    _, loss, ckpt = uninterrupted
    first_half, stopped_ckpt = stopped
    resumed_ckpt, metrics = tmp_path / "ckpt.pt", tmp_path / "m.jsonl"
    shutil.copy(stopped_ckpt, resumed_ckpt)
    out = launch("--compare", "--ckpt", resumed_ckpt, "--metrics", metrics, "--resume")
    assert "resumed from" in out and "at step 4" in out
    # The same model, optimizer state, learning-rate schedule and batches: bitwise equal.
    assert {**first_half, **losses(metrics)} == loss
    for run in ("fastnn", "torch"):
        final, reference = model_state(resumed_ckpt, run), model_state(ckpt, run)
        for name in reference:
            assert torch.equal(final[name], reference[name]), (run, name)
    optim = torch.load(resumed_ckpt, weights_only=True)["runs"]["fastnn"]["optim"]
    assert all(float(s["step"]) == 8 for s in optim["state"].values())


def test_fsdp2_resumes_a_ddp_checkpoint_and_trains_as_ddp_does(uninterrupted, stopped, tmp_path):
    _, ddp_loss, ddp_ckpt = uninterrupted
    ckpt, metrics = tmp_path / "ckpt.pt", tmp_path / "m.jsonl"
    shutil.copy(stopped[1], ckpt)  # full state dicts: one file for DDP and FSDP alike
    out = launch("--fsdp", "--compare", "--ckpt", ckpt, "--metrics", metrics, "--resume")
    assert "FSDP2 on 2 x cpu" in out and "at step 4" in out and "fastnn vs PyTorch" in out
    loss = losses(metrics)
    assert sorted(loss) == [(run, s) for run in ("fastnn", "torch") for s in range(5, 9)]
    for key, value in loss.items():  # reduce-scatter vs all-reduce: rounding order differs
        assert abs(value - ddp_loss[key]) <= RTOL[torch.float32][FORWARD] * abs(value), key
    for run in ("fastnn", "torch"):
        fsdp, ddp = model_state(ckpt, run), model_state(ddp_ckpt, run)
        assert fsdp.keys() == ddp.keys()
        for name in ddp:  # saved unsharded: the shapes of DDP's
            assert rel_error(fsdp[name], ddp[name]) <= RTOL[torch.float32][PARAM_GRAD], name


def test_compiled_fsdp2_run_trains_as_the_eager_ddp_run(uninterrupted, tmp_path):
    """--compile: the model and the optimizer step through Inductor, under FSDP2 (whose grads
    are views into one reduce-scatter buffer), the same losses and weights as eager DDP."""
    _, ddp_loss, ddp_ckpt = uninterrupted
    ckpt, metrics = tmp_path / "ckpt.pt", tmp_path / "m.jsonl"
    out = launch("--fsdp", "--compile", "--ckpt", ckpt, "--metrics", metrics, timeout=600)
    assert "FSDP2 on 2 x cpu" in out
    loss = losses(metrics)
    assert sorted(loss) == [("fastnn", s) for s in range(1, 9)]
    for key, value in loss.items():
        assert abs(value - ddp_loss[key]) <= RTOL[torch.float32][FORWARD] * abs(value), key
    compiled, eager = model_state(ckpt, "fastnn"), model_state(ddp_ckpt, "fastnn")
    for name in eager:
        assert rel_error(compiled[name], eager[name]) <= RTOL[torch.float32][PARAM_GRAD], name


# ---- the example's pieces, in process -----------------------------------------------------------


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        spec = importlib.util.spec_from_file_location("train_ddp", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(EXAMPLE.parent))


def test_twins_start_from_the_same_weights_and_compute_the_same_function(example):
    cfg = example.Config(vocab_size=11, dim=32, n_layers=2, n_heads=4, mlp_hidden=64, eps=1e-5)
    models = []
    for fast in (True, False):
        torch.manual_seed(0)
        models.append(example.Decoder(cfg, fast).double())
    fast, plain = models
    assert fast.state_dict().keys() == plain.state_dict().keys()
    for name, p in fast.state_dict().items():
        assert torch.equal(p, plain.state_dict()[name]), name
    tokens = torch.randint(0, 11, (3, 17))
    out_fast, out_plain = fast(tokens), plain(tokens)
    assert out_fast.shape == (3, 17, 11)
    torch.testing.assert_close(out_fast, out_plain, rtol=RTOL[torch.float64][FORWARD], atol=0)
    out_fast.square().sum().backward()
    out_plain.square().sum().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert rel_error(a.grad, b.grad) <= RTOL[torch.float64][PARAM_GRAD], name


def test_patch_turns_the_pytorch_twin_into_fastnn_layers(example):
    from fastnn.patch import patch

    cfg = example.Config(vocab_size=11, dim=32, n_layers=2, n_heads=4, mlp_hidden=64)
    report = patch(example.Decoder(cfg, fast=False))
    counts = {after: n for (_, after), n in report.counts().items()}
    assert counts == {"fastnn.RMSNorm": 5, "fastnn.SwiGLUMLP": 2}, str(report)


def test_corpus_is_deterministic_and_batches_depend_only_on_seed_step_rank(example):
    corpus = example.corpus
    text = corpus.generate(5000)
    assert text == corpus.generate(5000) and text != corpus.generate(5000, seed=1)
    assert len(text) >= 5000 and text.endswith("\n") and 25 <= len(set(text)) <= 60
    data = example.CharData(text)
    x, y = data.batch("train", 0, 3, 1, 4, 16, torch.device("cpu"))
    x2, y2 = data.batch("train", 0, 3, 1, 4, 16, torch.device("cpu"))
    assert torch.equal(x, x2) and torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, data.batch("train", 0, 3, 0, 4, 16, torch.device("cpu"))[0])
    # A split too short for one window is refused before training, naming the split.
    data.check_windows(16)
    with pytest.raises(SystemExit, match="validation split has"):
        data.check_windows(len(data.val))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--eval-batches", "0"], "--eval-batches must be at least 1"),
        (["--log-every", "0"], "--log-every must be at least 1"),
        (["--resume"], "--resume needs --ckpt"),
        (["--heads", "5"], "multiple of --heads"),
        (["--ckpt", "/no/such/dir/run.pt"], "its directory does not exist"),
        (["--stop-after", "0"], "--stop-after must be at least 1"),
    ],
)
def test_bad_flags_are_argument_errors(example, argv, message, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert message in capsys.readouterr().err


def test_only_rank_0_needs_the_checkpoint_directory(example, monkeypatch):
    monkeypatch.setenv("RANK", "8")  # another node's rank: rank 0 writes the checkpoint
    assert example.parse_args(["--ckpt", "/no/such/dir/run.pt"]).ckpt == "/no/such/dir/run.pt"
