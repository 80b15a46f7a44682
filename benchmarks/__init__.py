"""Benchmarks of the guard: scripts (``python benchmarks/proxy_overhead.py``) and packages
(``python -m benchmarks.purification``), run from the repository root; results in results/."""
