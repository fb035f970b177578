"""Triton kernels of the `triton` backend, one op family per module (rms_norm, layer_norm, glu,
adam, rmsprop). Each module defines Python launchers named and typed exactly as the op schemas in
csrc/library.cpp; fastnn/ops registers them as `fastnn::triton_<op>` and imports a module only on
its first call, so `import fastnn` never imports triton."""

import contextlib

import torch


def device_context(t):
    """Triton launches on torch's current CUDA device and stream: make them the tensor's (its
    params on cuda:1 while cuda:0 is current, say)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
