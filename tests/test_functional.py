"""The functional API against torch's own F.rms_norm / F.layer_norm / silu, on every backend."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, skip_unless_available

import fastnn
from fastnn import functional as FF


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 5)])
def test_rms_norm_matches_torch(backend, shape):
    skip_unless_available(backend, "rms_norm", "cpu")
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(shape[-1], dtype=torch.float64)
    with fastnn.use_backend(backend):
        out = FF.rms_norm(x, (shape[-1],), w)
    torch.testing.assert_close(out, F.rms_norm(x, (shape[-1],), w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_matches_torch(backend):
    skip_unless_available(backend, "layer_norm", "cpu")
    x = torch.randn(4, 6, dtype=torch.float64)
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    with fastnn.use_backend(backend):
        out = FF.layer_norm(x, (6,), w, b)
    torch.testing.assert_close(out, F.layer_norm(x, (6,), w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_matches_torch(backend):
    skip_unless_available(backend, "glu", "cpu")
    g, u = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    with fastnn.use_backend(backend):
        out = FF.swiglu(g, u)
    torch.testing.assert_close(out, F.silu(g) * u)
