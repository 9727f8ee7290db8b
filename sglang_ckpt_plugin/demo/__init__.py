"""The embedded default used by ``make demo``, the tests and the benchmarks: tiny random checkpoints."""
