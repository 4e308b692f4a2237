"""The names ``benchmarks/bench_ops.py`` imports from here; the probe is ``tests/support/op_probe.py``."""

from tests.support.op_probe import OpProbe, StepCounts, probe

__all__ = ["OpProbe", "StepCounts", "probe"]
