"""Drop-in optimizers: fastnn.optim.Adam / AdamW / RMSprop subclass torch.optim's, so
constructors, defaults, validation errors, param groups and state_dict layout are torch's own;
step() runs one fused update per (device, dtype) group of parameters."""

from fastnn.optim.adam import Adam, AdamW
from fastnn.optim.rmsprop import RMSprop

__all__ = ["Adam", "AdamW", "RMSprop"]
