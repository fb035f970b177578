"""Drop-in optimizers: fastnn.optim.Adam / AdamW / RMSprop subclass torch.optim's, so
constructors, defaults, validation errors, param groups, hooks and state_dict layout are torch's
own; step() runs one fused update per (device, dtype) group of parameters on the selected
backend (`fastnn.use_backend`), and never synchronises the host with the device.

- lr as a float or a tensor (read on the device), capturable=True (lr and step on the device,
  CUDA-graph capturable), foreach / fused accepted (the update is always fused; fused=True keeps
  the step on the device as torch's fused Adam does); differentiable=True is refused.
- GradScaler: as for torch's optimizers, it unscales the grads and skips a step with an inf
  itself; with fused=True (Adam / AdamW, as torch's fused Adam) it uses the fused protocol
  instead: grad_scale / found_inf read in the kernel, which leaves .grad unscaled as torch's
  fused Adam does, and a step with an inf found changes nothing, grads and step counts included,
  with no host sync.
- master_weights=True (keyword-only, fastnn's): fp32 copies of fp16 / bf16 params and fp32
  moments kept in the state (key "master_param") and in the state_dict.
- Params without grads are skipped (no state); zero-size params, several groups, complex params
  (updated as real views, as torch does), DDP bucket-view grads, DTensor params (FSDP2: the local
  shards are updated; the state is DTensor, as torch's).
"""

from fastnn.optim.adam import Adam, AdamW
from fastnn.optim.rmsprop import RMSprop

__all__ = ["Adam", "AdamW", "RMSprop"]
