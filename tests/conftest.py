"""Test configuration. The Triton interpreter must be switched on before anything imports
triton, so Triton kernels run (slowly: about 1 ms per program) on the CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastnn  # noqa: E402
from fastnn import _backend, ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


BACKENDS = ("torch", "native", "triton")


def skip_unless_available(backend, family, device):
    why = _backend.unavailable_reason(backend, family, device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if why is None and (backend, device) == ("triton", "cuda") and interpreted:
        if family.removesuffix("w") in ("adam", "rmsprop"):
            # The interpreter is on for CPU runs (above); the multi-tensor kernels take CUDA
            # tensors only compiled (make gpu-check runs the tests with TRITON_INTERPRET=0).
            why = "the multi-tensor kernels run on CUDA only compiled: set TRITON_INTERPRET=0"
    if why is not None:
        pytest.skip(f"{backend} backend unavailable for {family} on {device}: {why}")


@pytest.fixture
def small_triton_chunks(monkeypatch):
    """The Triton optimizers' multi-tensor chunks and blocks cut to 256 and 128 elements, so the
    interpreter runs few programs and small tensors still span several chunks."""
    from fastnn.triton_kernels import adam as triton_adam

    monkeypatch.setattr(triton_adam, "CHUNK", 256)
    monkeypatch.setattr(triton_adam, "BLOCK", 128)


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = fastnn.get_backend()
    yield
    fastnn.set_backend(previous)


__all__ = ["DEVICES", "HAS_CUDA", "BACKENDS", "ops", "skip_unless_available"]
