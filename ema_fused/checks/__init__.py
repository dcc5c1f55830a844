"""The bottom floor: checks every layer above imports downward (nothing here imports up).

    tensors.py   the ops' checks of tensor lists: pairs, writability, overlap, weights;
                 the float dtypes and which casts are lossless
    multi.py     the multi-shadow op's checks (K profiles over one list of params)
    scalars.py   strict reading of the numbers users pass (steps, decays, flags)
    rounding.py  rounding="nearest" | "stochastic", seeds and offsets, and the counter
                 words of a stochastic update that the op layer hands to the backends
    errors.py    ModelChangedError, raised wherever a model no longer matches its EMA
    devices.py   whether a device the user named can hold tensors here (CUDA without a driver)

The op layer (``ops.py``), the backends and the Triton launchers all check through here,
so ``ops.py`` can call into ``backends/`` without ``backends/`` importing back up.
"""
from . import devices, multi, rounding, tensors
from .errors import ModelChangedError
from .scalars import as_flag, as_int, as_optional_real, as_real
from .tensors import FLOAT_DTYPES, lossless

__all__ = ["devices", "multi", "rounding", "tensors", "ModelChangedError", "as_flag", "as_int",
           "as_optional_real", "as_real", "FLOAT_DTYPES", "lossless"]
