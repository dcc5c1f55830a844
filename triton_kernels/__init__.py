"""Triton kernels of ema_fused, installed as ``ema_fused.triton_kernels``.

``ema_kernels.py`` holds the kernels (update, copy, swap: every pair of a device in one
launch) and ``launch.py`` their tables, table cache and launches; ``sum_kernels.py`` the
weighted sum (kernel and launcher, on the same tables).  The ``triton``
backend (``ema_fused/backends/triton.py``) imports them on first use, so
``import ema_fused`` never needs Triton.
"""
