"""Benchmarks of the differential-attention variants against the standard Transformer (issue #8):
``diffattn bench attention|train|generate``. See docs/benchmarks.md for the measured tables."""
