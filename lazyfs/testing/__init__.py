"""Helpers for tests, the demo and the benchmarks (like ``trio.testing``): a real registry,
a fault-injecting proxy, layer and image builders, mounts, containerd, a token server.

Not used by the product itself; pytest fixtures around these live in ``tests/support``.
"""
