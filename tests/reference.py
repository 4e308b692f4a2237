"""The names ``benchmarks/bench_ops.py`` imports from here; the tests use ``tests.support``.

The reference clipper is ``tests/support/reference.py``, the clipping options
``tests/support/methods.py``.
"""

from tests.support.methods import CLIPPING_OPTIONS

__all__ = ["CLIPPING_OPTIONS"]
