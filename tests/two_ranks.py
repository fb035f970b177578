"""Runs a check on 2 gloo ranks (127.0.0.1, a free port, processes from
torch.multiprocessing.spawn) and returns what each rank's check returned (a string)."""

import importlib
import os
import socket
import sys
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, tests_dir, out_dir, module, function):
    # Spawned processes start fresh: the tests directory is not on their path, so the check
    # travels by name.
    sys.path.insert(0, tests_dir)
    # The pytest tmp_path, for checks that write files both ranks read (a checkpoint).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TWO_RANKS_DIR=out_dir)
    # A rank that fails makes the other's next collective fail within this, not torch's 30 min.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        result = getattr(importlib.import_module(module), function)(rank)
        with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
            f.write(result)
        dist.barrier()  # both ranks past their last collective before either tears down
    except BaseException:
        traceback.print_exc()  # spawn reports only the first rank's death, maybe not this one
        raise
    finally:
        dist.destroy_process_group()
    # Twice in CI (2026-11-27; not in 16 reruns) rank 0 died of SIGABRT with no Python error
    # ("terminate called without an active exception"), as a process does when gloo's worker
    # threads still hold tensors while the interpreter finalizes (pytorch PR 179291): a rank
    # that passed leaves without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(check, tmp_path):
    """check(rank) -> str, a module-level function of a test module, on both ranks; returns
    [rank 0's result, rank 1's]."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    args = (_free_port(), tests_dir, str(tmp_path), check.__module__, check.__name__)
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
    return [(tmp_path / f"rank{rank}").read_text() for rank in range(WORLD)]
