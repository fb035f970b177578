"""fastnn: fused RMSNorm, LayerNorm, GLU-family and Adam/AdamW/RMSprop kernels for PyTorch.

Drop-in replacements: `fastnn.RMSNorm` for `torch.nn.RMSNorm`, `fastnn.LayerNorm` for
`torch.nn.LayerNorm`, `fastnn.optim.AdamW` for `torch.optim.AdamW`, and so on. Importing fastnn
initialises no CUDA context and compiles nothing.
"""

from fastnn import functional, optim  # noqa: E402
from fastnn import ops as _ops  # noqa: F401  (registers the op namespace first)
from fastnn._backend import (  # noqa: E402
    BackendUnavailableError,
    get_backend,
    set_backend,
    use_backend,
)
from fastnn.modules import LayerNorm, RMSNorm, SwiGLU, SwiGLUMLP  # noqa: E402
from fastnn.ops import glu as _glu_ops  # noqa: F401
from fastnn.ops import layer_norm as _layer_norm_ops  # noqa: F401
from fastnn.ops import optim as _optim_ops  # noqa: F401
from fastnn.ops import rms_norm as _rms_norm_ops  # noqa: F401
from fastnn.patch import PatchReport, patch  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailableError",
    "LayerNorm",
    "PatchReport",
    "RMSNorm",
    "SwiGLU",
    "SwiGLUMLP",
    "functional",
    "get_backend",
    "optim",
    "patch",
    "set_backend",
    "use_backend",
]
