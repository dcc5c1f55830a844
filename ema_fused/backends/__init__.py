"""The kernel layer: backend selection and one module per backend.

    selection.py    the one place that picks cuda | triton | cpu | foreach for a group
                    of tensors on one device, and says why each other one was not chosen
    foreach.py      pure PyTorch (torch._foreach_lerp_), runs on every device
    triton.py       Triton kernels (ema_fused/triton_kernels/), one launch per device
    cpp.py          the C++ extension's kernel ops: "cuda" and "cpu"
    extension.py    loading the extension (AOT ema_fused._C) or building it just in time
    build_flags.py  what the extension is built from and with (setup.py loads it alone)

Importing this package registers every backend; none of them imports Triton or loads
the extension until it is first considered.
"""
from . import cpp, foreach, triton  # noqa: F401  (each registers its backend(s))
from .selection import (ENV_VAR, PREFERENCE, Backend, BackendUnavailableError,
                        available_backends, register_backend, resolve_name, select)

__all__ = ["ENV_VAR", "PREFERENCE", "Backend", "BackendUnavailableError", "available_backends",
           "register_backend", "resolve_name", "select"]
