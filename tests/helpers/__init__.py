"""Helpers shared by the tests (tests/ is on pytest's ``pythonpath``: ``from helpers.x import y``).

    numerics.py        seeded data, float64 references, the bound of one rounding
    paths.py           the repository root and the tests folder
    ema_reference.py   the EMA tests' small model, a stand-in optimizer step, the step rules in float64
    trajectory.py      record a real optimizer's parameter trajectory and replay it into an EMA
    dist_utils.py      multi-process (gloo) tests: spawn ranks with a deadline, sharded models
    posthoc_utils.py   PostHocEMA tests: a model with every kind of tensor, separate EMAs to compare
    csrc_tools.py      building the test-only C++/CUDA sources of tests/kernels/csrc/
    gpu.py             GPU tests: a kernel backend that must run, a graph captured after a warm-up
"""
