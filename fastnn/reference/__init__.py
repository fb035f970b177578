"""Pure-PyTorch reference implementations of every fastnn op.

They are the `torch` backend (the fallback on any device) and the oracle the kernels are tested
against. Each computes in fp32 for fp16 / bf16 / fp32 inputs and in fp64 for fp64 inputs (so
`gradcheck` can run on them), and rounds results to the tensors' own dtypes at the end.
"""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for tensors of `dtype`: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
