"""Triton kernels of ema_fused, installed as ``ema_fused.triton_kernels``.

Empty in this version: the Triton backend is not implemented yet, and
``available_backends()`` reports it as not usable.
"""
