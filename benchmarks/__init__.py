"""The ema_fused benchmark suite (``python benchmarks/run.py``); see ``run.py``.

A package so that ``run.py``, ``compare.py`` and the pytest-benchmark cases in
``test_bench.py`` share one set of models, providers and timers.
"""
