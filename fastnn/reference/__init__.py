"""Pure-PyTorch reference implementations of every fastnn op.

They are the `torch` backend (the fallback on any device) and the oracle the kernels are tested
against. Each computes in fp32 for fp16 / bf16 / fp32 inputs and in fp64 for fp64 inputs (so
`gradcheck` can run on them), and rounds results to the tensors' own dtypes at the end.
"""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for tensors of `dtype`: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def laid_out_like(t, ref):
    """t in the layout torch.empty_like(ref) gives, which the ops' fakes declare (and the
    kernels' outputs have): a result computed from several operands follows whichever layout
    the elementwise ops picked (a transposed gradient's, say), and torch.compile's Inductor
    asserts on strides that differ from the declared ones."""
    if t.stride() == ref.stride():  # the usual case, without an allocation to compare with
        return t
    out = torch.empty_like(ref, dtype=t.dtype)
    return t if out.stride() == t.stride() else out.copy_(t)
